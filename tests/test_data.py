"""sagan.data against a real S3 endpoint (SeaweedFS on loopback, see tests/fixtures/s3.py).

Every test asserts numbers: exact sample counts and keys, pixel and label equality with the
source after the same transform, exact skip/retry counts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time

import boto3
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from infra.local.s3 import free_port
from sagan.config import DataConfig
from sagan.data import (
    DataError,
    DataStats,
    Manifest,
    RetryPolicy,
    ShardInfo,
    eval_loader,
    load_manifest,
    open_source,
    prepare_dataset,
    train_loader,
    transform_image,
    write_shards,
)
from tests.fixtures.fashion import FashionSubset, write_fashion_shards

# --------------------------------------------------------------------------- helpers


def to_uint8(x) -> np.ndarray:
    """Invert the loader's [-1, 1] scaling exactly: (B, C, S, S) float -> uint8."""
    return np.rint((x.numpy() + 1.0) * 127.5).astype(np.uint8)


def s3() -> boto3.client:
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(samples: list[dict]) -> bytes:
    """A tar shard from raw member dicts ({'__key__': ..., 'png': bytes, 'cls': bytes})."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def member_offsets(tar: bytes) -> dict[str, int]:
    """Byte offset of each member's data in a tar."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.name: m.offset_data for m in tf.getmembers()}


def good_image(i: int) -> np.ndarray:
    """A 32x32 image that identifies i (value i in the first pixel, gradient elsewhere)."""
    a = ((np.arange(32 * 32).reshape(32, 32) + i * 7) % 256).astype(np.uint8)
    a[0, 0] = i % 256
    return a


def good(key: str, i: int, label: int = 0) -> dict:
    return {"__key__": key, "png": png(good_image(i)), "cls": str(label).encode()}


def put_dataset(bucket: str, prefix: str, shards: dict[str, bytes | None],
                counts: dict[str, int], num_classes: int = 10) -> str:
    """Upload raw shard bytes (None = listed but missing) and a manifest; return the s3 url."""
    client = s3()
    infos = []
    for name, data in shards.items():
        if data is not None:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        infos.append({"name": name, "samples": counts[name], "sha256": "0" * 64})
    manifest = {"source": "test", "image_size": 32, "channels": 1, "num_classes": num_classes,
                "class_names": [], "shards": infos, "total": sum(counts.values())}
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json",
                      Body=json.dumps(manifest).encode())
    return f"s3://{bucket}/{prefix}"


def collect(loader) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    xs, ys, keys, sizes = [], [], [], []
    for x, y, k in loader:
        xs.append(to_uint8(x))
        ys.append(y.numpy())
        keys += k
        sizes.append(len(k))
    return np.concatenate(xs), np.concatenate(ys), keys, sizes


def labelled_shards(out: str, n_shards: int, per_shard: int, endpoint_url: str | None = None
                    ) -> Manifest:
    """Shard i holds only label i, and every image is constant 10*i: where a sample came from
    is visible in the batch itself."""
    items = [(np.full((32, 32), 10 * i, np.uint8), i, f"s{i:02d}-{j:03d}")
             for i in range(n_shards) for j in range(per_shard)]
    return write_shards(items, out, image_size=32, channels=1, num_classes=n_shards,
                        class_names=None, source="labelled", samples_per_shard=per_shard,
                        endpoint_url=endpoint_url)


# --------------------------------------------------------------------------- single pass, S3


def test_s3_single_pass_every_sample_once_pixel_identical(
        fashion_subset: FashionSubset, fashion_shards: Manifest, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/fashion"
    written = write_fashion_shards(fashion_subset, url)
    assert [s.samples for s in written.shards] == [100] * 6 and written.total == 600

    m = load_manifest(url)
    assert m == written and m.location == url
    assert m.url("train-000003.tar") == f"{url}/train-000003.tar"
    # Same content at another location: same cache key.
    assert m.content_hash() == fashion_shards.content_hash()
    assert m.class_names[0] == "T-shirt/top" and m.num_classes == 10

    loader = eval_loader(url, batch_size=64, with_keys=True)
    x, y, keys, sizes = collect(loader)
    assert sizes == [64] * 9 + [24] and len(loader) == 10
    assert keys == [f"{i:09d}" for i in range(600)]  # every sample once, in manifest order
    assert x.shape == (600, 1, 32, 32)
    np.testing.assert_array_equal(x[:, 0], fashion_subset.images32)
    np.testing.assert_array_equal(y, fashion_subset.labels)
    assert loader.stats == DataStats(skipped_samples=0, skipped_shards=0, retries=0,
                                     samples=600)

    # A second pass is the same pass; `limit` cuts it exactly.
    xb, yb = next(iter(eval_loader(url, batch_size=600)))
    assert xb.dtype.is_floating_point and float(xb.min()) >= -1.0 and float(xb.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8(xb), x)
    limited = eval_loader(url, batch_size=64, limit=130, with_keys=True)
    _, _, lkeys, lsizes = collect(limited)
    assert lkeys == keys[:130] and lsizes == [64, 64, 2] and limited.stats.samples == 130


def test_http_prefix_reads_like_s3(fashion_subset: FashionSubset, s3_server: str,
                                   s3_bucket: str) -> None:
    write_fashion_shards(fashion_subset, f"s3://{s3_bucket}/pub", per_shard=250)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{s3_bucket}/*"}]}
    s3().put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))
    loader = eval_loader(f"{s3_server}/{s3_bucket}/pub", batch_size=100, with_keys=True)
    x, y, keys, _ = collect(loader)
    assert keys == [f"{i:09d}" for i in range(600)]
    np.testing.assert_array_equal(x[:, 0], fashion_subset.images32)
    np.testing.assert_array_equal(y, fashion_subset.labels)


def test_gopen_s3_is_registered_with_webdataset(fashion_subset: FashionSubset,
                                                s3_bucket: str) -> None:
    m = write_fashion_shards(fashion_subset, f"s3://{s3_bucket}/wds", per_shard=300)
    pipeline = wds.DataPipeline(wds.SimpleShardList(m.urls()), wds.tarfile_to_samples())
    keys = [s["__key__"] for s in pipeline]
    assert keys == [f"{i:09d}" for i in range(600)]


# --------------------------------------------------------------------------- prepare -> S3


def test_prepare_dataset_to_s3_is_idempotent_and_traceable(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/prep"
    first = prepare_dataset("fashion-mnist", url, limit=300, samples_per_shard=100, seed=1)
    assert [s.name for s in first.shards] == [f"train-00000{i}.tar" for i in range(3)]
    again = prepare_dataset("fashion-mnist", url, limit=300, samples_per_shard=100, seed=1)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]  # byte-identical
    assert again.content_hash() == first.content_hash()

    fewer = prepare_dataset("fashion-mnist", url, limit=300, samples_per_shard=250, seed=1)
    listed = sorted(o["Key"] for o in s3().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert listed == ["prep/manifest.json", "prep/train-000000.tar", "prep/train-000001.tar"]
    assert [s.samples for s in fewer.shards] == [250, 50] and fewer.total == 300

    # Keys are source indices of a seeded permutation; pixels are the transform of the source.
    src = open_source("fashion-mnist")
    expected = np.random.default_rng(1).permutation(len(src))[:300]
    x, y, keys, _ = collect(eval_loader(url, batch_size=128, with_keys=True))
    assert [int(k) for k in keys] == expected.tolist()
    for row in (0, 137, 299):
        img, label = src.get(int(keys[row]))
        np.testing.assert_array_equal(x[row, 0], transform_image(img, 32, 1))
        assert y[row] == label


# --------------------------------------------------------------------------- training mode


def test_train_two_ranks_two_workers_own_shards_equal_batches(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/labelled"
    labelled_shards(url, n_shards=8, per_shard=24)
    cfg = DataConfig(path=url, loader_workers=2, shuffle_buffer=20, hflip=False)
    per_rank = {}
    for rank in (0, 1):
        loader = train_loader(cfg, batch_size=8, rank=rank, world_size=2, batches_per_epoch=6,
                              seed=3)
        rank_shards = [f"train-{i:06d}.tar" for i in range(rank, 8, 2)]
        assert [s.name for s in loader.shards] == rank_shards and len(loader) == 6
        worker_labels = [set(range(rank, 8, 2)[w::2]) for w in (0, 1)]  # split_by_worker
        epochs = []
        for _ in range(2):
            batches = list(loader)
            assert len(batches) == 6
            for j, (x, y) in enumerate(batches):
                assert x.shape == (8, 1, 32, 32) and y.shape == (8,)
                assert set(y.tolist()) <= worker_labels[j % 2], (rank, j, y)
                # the image still says which shard it came from
                np.testing.assert_array_equal(to_uint8(x)[:, 0, 0, 0], 10 * y.numpy())
            epochs.append(np.concatenate([to_uint8(x) for x, _ in batches]))
        assert not np.array_equal(epochs[0], epochs[1])  # epoch 2 continues, not a replay
        assert loader.stats == DataStats(skipped_samples=0, skipped_shards=0, retries=0,
                                         samples=2 * 6 * 8)
        per_rank[rank] = sum(len(e) for e in epochs)
        loader.close()
    assert per_rank[0] == per_rank[1] == 96


def test_fewer_shards_than_ranks_never_leaves_a_rank_empty(tmp_path, caplog) -> None:
    m = labelled_shards(str(tmp_path / "one"), n_shards=1, per_shard=10)
    cfg = DataConfig(path=m.location, loader_workers=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="sagan.data"):
        for rank in range(3):
            loader = train_loader(cfg, batch_size=4, rank=rank, world_size=3,
                                  batches_per_epoch=5)
            assert sum(len(x) for x, _ in loader) == 20
    assert "ranks will share shards" in caplog.text


def test_hflip_flips_about_half(fashion_subset: FashionSubset, fashion_shards: Manifest) -> None:
    originals = {im.tobytes() for im in fashion_subset.images32}
    flipped = {im[:, ::-1].tobytes() for im in fashion_subset.images32}
    counts = {}
    for hflip in (False, True):
        cfg = DataConfig(path=fashion_shards.location, loader_workers=0, shuffle_buffer=100,
                         hflip=hflip)
        n_orig = n_flip = 0
        for x, _ in train_loader(cfg, batch_size=50, batches_per_epoch=12, seed=1):
            for im in to_uint8(x)[:, 0]:
                b = im.tobytes()
                n_orig += b in originals
                n_flip += b in flipped and b not in originals
                assert b in originals or b in flipped
        counts[hflip] = (n_orig, n_flip)
    assert counts[False] == (600, 0)
    assert counts[True][0] + counts[True][1] == 600 and 200 < counts[True][1] < 400


def test_stats_from_loader_workers_are_exact_in_main_process(tmp_path) -> None:
    """Two bad samples lead each shard read; each batch is exactly one shard's 10 good ones, so
    after N batches the main process must have counted exactly 2N skipped samples."""
    out = tmp_path / "mixed"
    out.mkdir()
    shards, counts = {}, {}
    for s in range(2):
        bad = [{"__key__": f"{s}a", "png": b"garbage", "cls": b"1"},
               {"__key__": f"{s}b", "png": png(np.zeros((28, 28), np.uint8)), "cls": b"1"}]
        name = f"train-{s:06d}.tar"
        shards[name] = tar_bytes(bad + [good(f"{s}g{i:02d}", i) for i in range(10)])
        counts[name] = 12
        (out / name).write_bytes(shards[name])
    m = Manifest("test", 32, 1, 10, [], [ShardInfo(n, 12, "0" * 64) for n in shards], 24)
    (out / "manifest.json").write_text(m.to_json())
    cfg = DataConfig(path=str(out), loader_workers=2, shuffle_buffer=0)
    loader = train_loader(cfg, batch_size=10, batches_per_epoch=6)
    assert sum(len(x) for x, _ in loader) == 60
    assert loader.stats == DataStats(skipped_samples=12, skipped_shards=0, retries=0, samples=60)
    loader.close()


def test_epochs_are_fresh_draws_and_reproducible_from_the_seed(tmp_path) -> None:
    """Re-iterating the loader (persistent workers) draws a new epoch, not a replay of the
    first; the same seed gives the same epochs, another seed others."""
    m = labelled_shards(str(tmp_path / "ep"), n_shards=4, per_shard=16)

    def epochs(seed: int) -> list[np.ndarray]:
        cfg = DataConfig(path=m.location, loader_workers=2, shuffle_buffer=16, hflip=True)
        loader = train_loader(cfg, batch_size=8, batches_per_epoch=4, seed=seed)
        out = [np.concatenate([to_uint8(x) for x, _ in loader]) for _ in range(3)]
        assert loader.stats.samples == 3 * 4 * 8 and loader.epoch == 3
        loader.close()
        return out

    first, again, other = epochs(5), epochs(5), epochs(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


# --------------------------------------------------------------------------- corrupt inputs


def test_corrupt_inputs_are_skipped_and_counted(s3_bucket: str, caplog) -> None:
    a = [good(f"a{i:02d}", i, i % 10) for i in range(10)]
    a += [{"__key__": "a10", "png": b"this is not a png", "cls": b"1"},        # non-PNG member
          {"__key__": "a11", "png": png(np.zeros((28, 28), np.uint8)), "cls": b"2"},  # size
          {"__key__": "a12", "png": png(good_image(12))},                     # missing label
          {"__key__": "a13", "png": png(good_image(13)), "cls": b"x"},        # invalid label
          {"__key__": "a14", "png": png(np.zeros((32, 32, 3), np.uint8)), "cls": b"3"}]  # RGB
    a += [good(f"a{i:02d}", i, i % 10) for i in range(15, 17)]
    b_full = tar_bytes([good(f"b{i:02d}", 100 + i, 4) for i in range(20)])
    cut = member_offsets(b_full)["b12.png"] + 50  # inside sample 12's PNG data
    shards = {
        "train-000000.tar": tar_bytes(a),
        "train-000001.tar": b_full[:cut],                                     # truncated tar
        "train-000002.tar": tar_bytes([good(f"c{i:02d}", 200 + i, 5) for i in range(15)]),
        "train-000003.tar": os.urandom(5000),                                 # not a tar
        "train-000004.tar": None,                                             # missing object
    }
    counts = dict(zip(shards, [17, 20, 15, 5, 5], strict=True))
    url = put_dataset(s3_bucket, "corrupt", shards, counts)

    with caplog.at_level(logging.WARNING, logger="sagan.data"):
        loader = eval_loader(url, batch_size=16, with_keys=True)
        x, y, keys, _ = collect(loader)
    expected = ([f"a{i:02d}" for i in (*range(10), 15, 16)] + [f"b{i:02d}" for i in range(12)]
                + [f"c{i:02d}" for i in range(15)])
    assert keys == expected
    # 5 bad samples in shard 0, 1 torn by the truncation; truncated, non-tar, missing shards.
    assert loader.stats == DataStats(skipped_samples=6, skipped_shards=3, retries=0,
                                     samples=39)
    idx = [int(k[1:]) + {"a": 0, "b": 100, "c": 200}[k[0]] for k in keys]
    np.testing.assert_array_equal(x[:, 0], np.stack([good_image(i) for i in idx]))
    assert y.tolist()[:12] == [i % 10 for i in (*range(10), 15, 16)]
    for fragment in ("a10", "a11", "a12", "a13", "train-000001.tar", "train-000003.tar",
                     "train-000004.tar"):
        assert fragment in caplog.text


def test_shard_cut_at_a_header_is_caught_by_the_manifest_count(tmp_path, caplog) -> None:
    """tarfile stops silently at a torn header; the manifest's count still exposes the loss."""
    m = labelled_shards(str(tmp_path / "cut"), n_shards=3, per_shard=20)
    shard = tmp_path / "cut" / "train-000001.tar"
    data = shard.read_bytes()
    header = member_offsets(data)["s01-007.cls"] - 512  # the member's header block
    shard.write_bytes(data[:header + 100])
    with caplog.at_level(logging.WARNING, logger="sagan.data"):
        loader = eval_loader(m.location, batch_size=16, with_keys=True)
        _, _, keys, _ = collect(loader)
    assert keys == [f"s{i:02d}-{j:03d}" for i in range(3) for j in range(20)
                    if i != 1 or j < 7]
    assert loader.stats == DataStats(skipped_samples=0, skipped_shards=1, retries=0, samples=47)
    assert "train-000001.tar ended after 7 of 20 samples" in caplog.text


def test_all_corrupt_set_fails_fast_and_clearly(s3_bucket: str) -> None:
    garbage = {f"train-{i:06d}.tar": os.urandom(3000) for i in range(3)}
    url = put_dataset(s3_bucket, "garbage", garbage, dict.fromkeys(garbage, 10))
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"no readable samples .* skipped 3 of 3 shards.*"
                                        r"tar error: (bad checksum|invalid header)") as ei:
        list(eval_loader(url, batch_size=8))
    assert "\n" not in str(ei.value)

    # Training stream, errors raised in loader worker processes: one clean line in the main one.
    loader = train_loader(DataConfig(path=url, loader_workers=2), batch_size=8,
                          batches_per_epoch=3)
    with pytest.raises(DataError, match="no readable samples") as ei:
        list(loader)
    assert "\n" not in str(ei.value) and "Traceback" not in str(ei.value)

    # Valid tars whose every sample is corrupt: also an error, not an endless skip loop.
    bad = {f"train-{i:06d}.tar": tar_bytes([{"__key__": f"k{j}", "png": b"no", "cls": b"0"}
                                            for j in range(4)]) for i in range(2)}
    url2 = put_dataset(s3_bucket, "bad-samples", bad, dict.fromkeys(bad, 4))
    with pytest.raises(DataError, match="no readable samples"):
        list(train_loader(DataConfig(path=url2, loader_workers=0), batch_size=4,
                          batches_per_epoch=2))
    assert time.monotonic() - t0 < 20


def test_verify_sha256_rejects_a_modified_shard(fashion_shards: Manifest, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fashion_shards.location, copy)
    shard = copy / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # in the zero padding after the end-of-archive marker: still a valid tar
    shard.write_bytes(bytes(data))
    plain = eval_loader(str(copy), batch_size=200)
    assert sum(len(x) for x, _ in plain) == 600 and plain.stats.skipped_shards == 0
    checked = eval_loader(DataConfig(path=str(copy), verify_sha256=True), batch_size=200)
    assert sum(len(x) for x, _ in checked) == 500
    assert checked.stats == DataStats(skipped_samples=0, skipped_shards=1, retries=0,
                                      samples=500)


# --------------------------------------------------------------------------- network faults


@pytest.mark.slow
def test_connections_dropped_mid_stream_full_pass_still_exact(
        fashion_subset: FashionSubset, s3_server: str, s3_bucket: str, tcp_proxy) -> None:
    url = f"s3://{s3_bucket}/fault"
    m = write_fashion_shards(fashion_subset, url, per_shard=300)  # 2 shards of ~1.4 MB
    proxy = tcp_proxy(s3_server)
    shard_bytes = s3().head_object(Bucket=s3_bucket, Key="fault/train-000000.tar")[
        "ContentLength"]
    proxy.cut_after(shard_bytes // 2, 3.0)  # mid-way through shard 0, then 3 s of resets
    t0 = time.monotonic()
    loader = eval_loader(url, batch_size=50, with_keys=True, endpoint_url=proxy.endpoint_url,
                         manifest=m)
    x, y, keys, _ = collect(loader)
    elapsed = time.monotonic() - t0
    assert proxy.cuts == 1 and elapsed > 2.0  # the outage really hit this pass
    assert keys == [f"{i:09d}" for i in range(600)]
    np.testing.assert_array_equal(x[:, 0], fashion_subset.images32)
    np.testing.assert_array_equal(y, fashion_subset.labels)
    st = loader.stats
    assert (st.samples, st.skipped_samples, st.skipped_shards) == (600, 0, 0)
    assert st.retries >= 1


def test_dead_endpoint_is_a_clear_error_within_seconds(fashion_shards: Manifest,
                                                       s3_server: str) -> None:
    url = "s3://no-server-here/dead"
    manifest = Manifest(**{**fashion_shards.__dict__, "location": url})
    nothing = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=0.5, max_outage_s=1.5,
                         connect_timeout=1.0)
    t0 = time.monotonic()
    # Whichever gives up first, the outage clock or the last shard, the line names the cause.
    with pytest.raises(DataError, match="(unreachable|no readable samples).*Could not connect"
                       ) as ei:
        list(eval_loader(url, batch_size=100, endpoint_url=nothing, manifest=manifest,
                         retry=policy))
    assert time.monotonic() - t0 < 15
    assert "\n" not in str(ei.value)


# --------------------------------------------------------------------------- manifest & writer


def test_manifest_errors_name_the_field(tmp_path, fashion_shards: Manifest) -> None:
    with pytest.raises(DataError, match="no manifest.json at .*prepare_data.py"):
        load_manifest(str(tmp_path / "nothing"))
    d = fashion_shards.to_dict()
    for field, value, match in (("channels", 2, "'channels' must be 1 or 3"),
                                ("total", 5, "'total' is 5 but the shards hold 600"),
                                ("shards", [{"name": "../x", "samples": 1, "sha256": ""}],
                                 r"'shards\[0\].name'")):
        bad = tmp_path / field
        bad.mkdir()
        (bad / "manifest.json").write_text(json.dumps({**d, field: value}))
        with pytest.raises(DataError, match=match):
            load_manifest(str(bad))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "manifest.json").write_text("{nope")
    with pytest.raises(DataError, match="invalid JSON"):
        load_manifest(str(tmp_path / "json" / "manifest.json"))


def test_write_shards_validates_and_never_leaves_a_stale_manifest(tmp_path) -> None:
    out = tmp_path / "w"
    labelled_shards(str(out), n_shards=3, per_shard=5)
    assert (out / "manifest.json").exists()

    def explode():
        yield np.zeros((32, 32), np.uint8), 0
        raise RuntimeError("reader crashed")

    with pytest.raises(RuntimeError, match="reader crashed"):
        write_shards(explode(), str(out), 32, 1, 3, None, "x", samples_per_shard=1)
    assert not (out / "manifest.json").exists()  # old manifest gone: no half-new dataset
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-shards-")]

    cases = [([(np.zeros((28, 28), np.uint8), 0)], "sample 0: image must be uint8"),
             ([(np.zeros((32, 32), np.uint8), 7)], r"sample 0: label 7 is not an integer"),
             ([(np.zeros((32, 32), np.uint8), 0, "a.b")], "key 'a.b'"),
             ([], "no samples to write")]
    for items, match in cases:
        with pytest.raises(DataError, match=match):
            write_shards(items, str(out), 32, 1, 3, None, "x")
    with pytest.raises(DataError, match="http.*read-only"):
        write_shards([], "http://example.invalid/x", 32, 1, 0, None, "x")
