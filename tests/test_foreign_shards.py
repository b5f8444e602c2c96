"""Issue 25, library side: shards as the ecosystem writes them (`webdataset.ShardWriter`, any
image member, labels in `cls` or `json`), indexed instead of re-encoded, then read by the same
loaders as ours. Local files here; the S3 + Ray + `ray job submit` path: test_foreign_e2e.py."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines.config import load_run_config
from pipelines.preflight import PreflightError, ensure_data
from sagan.data import (
    DataError,
    NotIndexed,
    build_index,
    eval_loader,
    load_manifest,
    train_loader,
    transform_image,
)

SIZES = [(40, 30), (64, 48), (24, 24)]  # w, h: landscape, larger, smaller than 32


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_foreign(root: Path, n: int = 30, per_shard: int = 10, key: str = "png",
                  cls: bool = True, json_label: bool = False, name: str = "ds-train",
                  mode: str = "RGB") -> list[tuple[np.ndarray, int]]:
    """Shards written as the ecosystem does: `<name>-%06d.tar` by webdataset's ShardWriter
    with its default encoders (`cls` int -> text, `json` dict -> JSON). Returns the images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[key]
    with wds.ShardWriter(str(root / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            w_, h_ = SIZES[i % len(SIZES)]
            shape = (h_, w_, 3) if mode == "RGB" else (h_, w_)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            sample = {"__key__": f"img{i:05d}", key: _encode(arr, fmt),
                      "txt": f"caption {i}"}
            if cls:
                sample["cls"] = i % 4
            if json_label:
                sample["json"] = {"label": ["cat", "dog", "bird"][i % 3], "id": i}
            w.write(sample)
            out.append((arr, i % 4))
    return out


def test_index_records_counts_checksums_keys_sizes_and_classes(tmp_path):
    write_foreign(tmp_path, n=30, per_shard=10, key="jpg", json_label=True)
    spec = str(tmp_path / "ds-train-{000000..000002}.tar")
    m = build_index(spec)
    assert m.is_index and m.total == 30 and [s.samples for s in m.shards] == [10, 10, 10]
    for s in m.shards:
        assert s.sha256 == hashlib.sha256((tmp_path / s.name).read_bytes()).hexdigest()
    assert m.index["keys"] == {"cls": 30, "jpg": 30, "json": 30, "txt": 30}
    assert m.index["image_sizes"] == {"40x30": 10, "64x48": 10, "24x24": 10}
    assert m.index["class_counts"] == {"0": 8, "1": 8, "2": 7, "3": 7}
    assert m.num_classes == 4 and m.channels == 3 and m.index["bad_shards"] == []
    assert m.location.startswith(str(tmp_path / ".sagan-index" / "ds-train-000000-000002.tar-"))
    # training reads it back from its default place; the same shards as a directory too
    assert load_manifest(spec) == m
    as_dir = build_index(str(tmp_path))
    assert [s.sha256 for s in as_dir.shards] == [s.sha256 for s in m.shards]
    assert as_dir.location != m.location
    # shards with no index yet: one line saying how to build it
    with pytest.raises(NotIndexed) as exc:
        load_manifest(str(tmp_path / "ds-train-{000000..000001}.tar"))
    assert "not indexed yet" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("fit", ["crop", "resize", "pad"])
def test_indexed_samples_are_the_prepare_transform_of_the_originals(tmp_path, fit):
    """Lossless members: what the loader yields is exactly transform_image of the original
    image at the bound size, fit and channels (as prepare_data.py --fit would write it)."""
    originals = write_foreign(tmp_path, n=12, per_shard=6, key="png")
    m = build_index(str(tmp_path / "ds-train-{000000..000001}.tar"))
    for channels in (3, 1):
        bound = m.bind(32, channels, fit)
        xs, ys = [], []
        for x, y in eval_loader(None, 5, manifest=bound):
            xs.append(x)
            ys.append(y)
        got = np.concatenate([x.numpy() for x in xs])
        assert got.shape == (12, channels, 32, 32)
        for i, (arr, _) in enumerate(originals):
            want = transform_image(arr, 32, channels, fit).astype(np.float32) / 127.5 - 1
            want = want[None] if channels == 1 else want.transpose(2, 0, 1)
            np.testing.assert_allclose(got[i], want, atol=1e-6)
        assert np.concatenate([y.numpy() for y in ys]).tolist() == [lb for _, lb in originals]


def test_json_field_labels_and_unlabelled_shards(tmp_path):
    write_foreign(tmp_path / "a", n=9, per_shard=9, key="webp", cls=False, json_label=True)
    m = build_index(str(tmp_path / "a"), label="json:label")
    assert m.class_names == ["bird", "cat", "dog"] and m.index["labels"] == "names"
    ys = np.concatenate([y.numpy() for _, y in eval_loader(None, 4, manifest=m.bind(32, 3))])
    assert ys.tolist() == [["bird", "cat", "dog"].index(["cat", "dog", "bird"][i % 3])
                           for i in range(9)]
    unlabelled = build_index(str(tmp_path / "a"))  # label cls, absent: unconditional
    assert unlabelled.num_classes == 0
    (x, y), = eval_loader(None, 9, manifest=unlabelled.bind(32, 3))
    assert y is None and x.shape == (9, 3, 32, 32)
    # labelled shards, unconditional model: labels dropped
    labelled = build_index(str(tmp_path / "a"), label="json:id")
    assert labelled.num_classes == 9 and labelled.bind(32, 3, num_classes=0).num_classes == 0


def test_bad_input_is_one_line_naming_the_shard(tmp_path):
    write_foreign(tmp_path, n=20, per_shard=10, key="jpg")
    with pytest.raises(DataError) as exc:
        build_index(str(tmp_path / "ds-train-{000000..000002}.tar"))
    assert str(exc.value) == (f"shard {tmp_path}/ds-train-000002.tar (named by "
                              f"{tmp_path}/ds-train-{{000000..000002}}.tar) does not exist")
    with pytest.raises(DataError) as exc:
        build_index(str(tmp_path), image_key="png")
    assert str(exc.value).startswith(f"shard {tmp_path}/ds-train-000000.tar has no image "
                                     "member 'png' (its samples have: cls, jpg, txt)")
    # a shard that is not a tar is listed as bad, the others are indexed; nothing is written
    # over the shards themselves
    (tmp_path / "ds-train-000002.tar").write_bytes(b"this is not a tar archive" * 40)
    m = build_index(str(tmp_path))
    assert [s.name for s in m.shards] == ["ds-train-000000.tar", "ds-train-000001.tar"]
    (bad,) = m.index["bad_shards"]
    assert bad["name"] == "ds-train-000002.tar" and "\n" not in bad["error"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "ds-train-000000.tar", "ds-train-000001.tar", "ds-train-000002.tar"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^no manifest.json and no .tar shards at {tmp_path}/"):
        build_index(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"^cannot list .*/missing: No such file or directory$"):
        build_index(str(tmp_path / "missing"))


def test_undecodable_images_and_cut_shards_are_skipped_and_counted(tmp_path):
    write_foreign(tmp_path, n=20, per_shard=10, key="jpg")
    with wds.TarWriter(str(tmp_path / "ds-train-000002.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"bad{i}", "jpg": b"\xff\xd8 not really a jpeg" if i < 2
                     else _encode(np.zeros((8, 8, 3), np.uint8), "JPEG"), "cls": b"1"})
    m = build_index(str(tmp_path))
    assert m.total == 25
    loader = eval_loader(None, 8, manifest=m.bind(32, 3))
    assert sum(x.shape[0] for x, _ in loader) == 23 and loader.stats.skipped_samples == 2
    # a shard changed after indexing fails data.verify_sha256 (the index's checksum)
    blob = bytearray((tmp_path / "ds-train-000001.tar").read_bytes())
    blob[700] ^= 0xFF
    (tmp_path / "ds-train-000001.tar").write_bytes(bytes(blob))
    loader = eval_loader(None, 8, manifest=m.bind(32, 3), verify_sha256=True)
    assert sum(x.shape[0] for x, _ in loader) == 13 and loader.stats.skipped_shards == 1
    # a shard cut after indexing: the per-shard count catches what tarfile does not report
    data = (tmp_path / "ds-train-000000.tar").read_bytes()
    (tmp_path / "ds-train-000000.tar").write_bytes(data[: len(data) // 2])
    loader = eval_loader(None, 8, manifest=m.bind(32, 3))
    n = sum(x.shape[0] for x, _ in loader)
    assert n < 23 and loader.stats.skipped_shards == 1


def test_training_stream_splits_indexed_shards_by_rank(tmp_path):
    write_foreign(tmp_path, n=40, per_shard=10, key="jpg")
    m = build_index(str(tmp_path)).bind(32, 3, "crop")
    loaders = [train_loader(None, 4, rank=r, world_size=2, batches_per_epoch=3, manifest=m)
               for r in range(2)]
    try:
        assert [s.name for s in loaders[0].shards] == ["ds-train-000000.tar",
                                                       "ds-train-000002.tar"]
        assert [s.name for s in loaders[1].shards] == ["ds-train-000001.tar",
                                                       "ds-train-000003.tar"]
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == 3
            assert all(x.shape == (4, 3, 32, 32) and y.max() < 4 for x, y in batches)
    finally:
        for loader in loaders:
            loader.close()


def _cfg(tmp_path, *overrides):
    return load_run_config(None, ["model.image_size=32", "model.g_attention=[]",
                                  "model.d_attention=[]", "data.prepare_source=null",
                                  f"cluster.storage_path={tmp_path / 'runs'}", *overrides])


def test_preflight_binds_the_index_and_checks_labels_against_the_model(tmp_path):
    write_foreign(tmp_path, n=20, per_shard=10, key="jpg")
    build_index(str(tmp_path))
    m = ensure_data(_cfg(tmp_path, f"data.path={tmp_path}", "model.num_classes=4"))
    assert (m.image_size, m.channels, m.num_classes, m.fit) == (32, 3, 4, "crop")
    with pytest.raises(PreflightError) as exc:
        ensure_data(_cfg(tmp_path, f"data.path={tmp_path}", "model.num_classes=3"))
    assert str(exc.value) == (f"data.path '{tmp_path}': label 3 in shard ds-train-000000.tar "
                              "is outside model.num_classes=3 (labels must be in [0, 3))")
    unconditional = ensure_data(_cfg(tmp_path, f"data.path={tmp_path}", "model.num_classes=0"))
    assert unconditional.num_classes == 0
    write_foreign(tmp_path / "nolabel", n=10, key="jpg", cls=False)
    build_index(str(tmp_path / "nolabel"))
    with pytest.raises(PreflightError, match=r"the shards have no label \(cls: their keys are "
                                             r"jpg, txt\) but model.num_classes=10; set data"):
        ensure_data(_cfg(tmp_path, f"data.path={tmp_path / 'nolabel'}", "model.num_classes=10"))


def test_index_elsewhere_for_read_only_shards(tmp_path):
    """The index can live under another prefix (data.index); it must describe these shards."""
    write_foreign(tmp_path / "ro", n=20, per_shard=10, key="jpg")
    before = sorted(p.name for p in (tmp_path / "ro").iterdir())
    spec = str(tmp_path / "ro" / "ds-train-{000000..000001}.tar")
    m = build_index(spec, out=str(tmp_path / "idx"))
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == before  # nothing written there
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["shard_base"] == \
        str(tmp_path / "ro")
    cfg = _cfg(tmp_path, f"data.path={spec}", f"data.index={tmp_path / 'idx'}",
               "model.num_classes=4")
    bound = ensure_data(cfg)
    assert bound.location == m.location and bound.shards == m.shards
    with pytest.raises(NotIndexed):  # without data.index it looks beside the shards
        load_manifest(spec)
    write_foreign(tmp_path / "other", n=10, key="jpg")
    other = str(tmp_path / "other" / "ds-train-000000.tar")
    with pytest.raises(DataError, match=r"is not an index of .*other/ds-train-000000.tar"):
        load_manifest(other, index=str(tmp_path / "idx"))


def test_a_real_set_given_as_a_path_finds_its_index(tmp_path):
    """eval.real_path is a bare path string: its index is looked up with the defaults (beside
    the shards), never with attributes of the string."""
    from sagan.data import index_options
    from sagan.eval.real import prepare_real

    assert index_options(str(tmp_path)) == {"index": None, "image_key": None, "label": "cls"}
    write_foreign(tmp_path, n=12, per_shard=6, key="jpg")
    spec = str(tmp_path / "ds-train-{000000..000001}.tar")
    with pytest.raises(NotIndexed):
        prepare_real(spec, 10, 32)
    build_index(spec)
    real = prepare_real(spec, 10, 32)
    assert real.num_images == 10 and tuple(real.images().shape) == (10, 3, 32, 32)


@pytest.mark.slow
def test_foreign_stream_benchmark_runs_and_reports_a_ratio(tmp_path):
    """`python -m bench.data_stream --mode foreign` at a tiny size: it writes both sides of
    the same images, streams them and reports the foreign/ours ratio (numbers: PERFORMANCE.md)."""
    import subprocess
    import sys

    out = tmp_path / "foreign.json"
    proc = subprocess.run([sys.executable, "-m", "bench.data_foreign", "--images", "60",
                           "--sizes", "32", "--repeats", "1", "--batch-size", "16",
                           "--out", str(out)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    r = report["results"]["32"]
    assert r["foreign_jpeg_img_per_s"] > 0 and r["ours_png_img_per_s"] > 0
    assert r["ratio_foreign_over_ours"] == pytest.approx(
        r["foreign_jpeg_img_per_s"] / r["ours_png_img_per_s"], rel=0.01)
    assert report["index_scan"]["images"] == 60
