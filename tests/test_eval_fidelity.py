"""Precision / recall, density / coverage, intra-class FID, the truncation trick and the protocol
logged with every score (issue #28).

Value tests on the standard Inception features share the session fixture `standard_features`
(tests/fixtures/inception.py: 200 Fashion-MNIST images per set, featurised once, also used by
tests/test_eval_standard.py). The plumbing tests (evaluate.py, the truncation curve, MLflow) use
the fixed-random-init weights, as tests/test_eval.py does: deterministic, not quality scores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sagan.eval as E
from sagan.config import ConfigError, load_config
from sagan.eval.names import IFID_CLASS_PREFIX, METRICS
from tests.test_eval import N, _checkpoint, grey_shards  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


# --------------------------------------------------------------------------- registry


def test_one_metric_registry_drives_config_and_cli() -> None:
    assert list(METRICS) == ["fid", "kid", "is", "prc", "dc", "ifid"]
    assert E.score_keys(["dc", "fid"]) == ["fid", "density", "coverage"]  # registry order
    cfg = load_config(None, ["eval.metrics=[fid, prc, dc, ifid]"])
    assert cfg.eval.metrics == ["fid", "prc", "dc", "ifid"]
    assert load_config(None, []).eval.metrics == ["fid", "kid"]  # in-training default
    with pytest.raises(ConfigError, match=r"eval.metrics\[1\].*fid, kid, is, prc, dc, ifid"):
        load_config(None, ["eval.metrics=[fid, lpips]"])
    with pytest.raises(ConfigError, match="'eval.metrics'.*conditional"):
        load_config(None, ["eval.metrics=[fid, ifid]", "model.num_classes=0"])
    proc = subprocess.run([sys.executable, "pipelines/evaluate.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "fid,kid,is,prc,dc,ifid" in proc.stdout.replace("\n", "")


# --------------------------------------------------------------------------- pure values


def test_precision_recall_agree_with_the_prdc_reference_and_react_as_the_papers_say() -> None:
    """torch-fidelity's P/R (k=3) equal the prdc package's on the same features (no ties in
    continuous data): arguments are not swapped. Same distribution: all four near 1; a
    shifted generator loses precision and density; a collapsed one recall and coverage."""
    import prdc

    real, same = _gauss(400, 8, 0), _gauss(400, 8, 1)
    ref = prdc.compute_prdc(real.numpy(), same.numpy(), nearest_k=3)
    pr = E.precision_recall(same, real)
    assert pr == pytest.approx({"precision": ref["precision"], "recall": ref["recall"]})
    assert pr["precision"] > 0.85 and pr["recall"] > 0.85  # measured 0.87, 0.88
    dc = E.density_coverage(same, real)
    assert 0.85 < dc["density"] < 1.15 and dc["coverage"] > 0.95  # 0.94, 0.965
    # a generator drawing a sub-region of the real support: precise but not diverse
    narrow = 0.3 * same
    assert E.precision_recall(narrow, real)["precision"] > 0.95
    assert E.precision_recall(narrow, real)["recall"] < 0.05
    far = _gauss(400, 8, 2, shift=3.0)
    assert E.precision_recall(far, real)["precision"] < 0.05
    assert E.density_coverage(far, real) == {"density": 0.0, "coverage": 0.0}
    collapsed = same[:1].repeat(400, 1)
    assert E.precision_recall(collapsed, real)["recall"] < 0.01
    assert E.density_coverage(collapsed, real)["coverage"] < 0.02


def test_intra_class_fid_sees_good_images_of_the_wrong_class() -> None:
    """Three well-separated classes: a generator that draws each class's images under the
    wrong label has the same FID but a far worse iFID; per-class values come back too."""
    means = torch.tensor([[0.0] * 8, [6.0] * 8, [-6.0] * 8])
    y = torch.arange(600) % 3
    real = means[y] + _gauss(600, 8, 0)
    fake = means[y] + _gauss(600, 8, 1)
    right = E.intra_class_fid(fake, y, real, y)
    wrong = E.intra_class_fid(fake, (y + 1) % 3, real, y)
    assert set(right) == {"ifid", *(f"{IFID_CLASS_PREFIX}{c}" for c in range(3))}
    assert right["ifid"] == pytest.approx(np.mean([right[f"ifid/{c}"] for c in range(3)]))
    assert right["ifid"] < 1.0 and wrong["ifid"] > 100
    both = E.scores({"2048": fake}, {"2048": real}, ["fid", "ifid"], (y + 1) % 3, y)
    assert both["fid"] < 1.0 and both["ifid"] == pytest.approx(wrong["ifid"])
    with pytest.raises(E.RealDataError, match="ifid"):
        E.scores({"2048": fake}, {"2048": real}, ["ifid"])


def test_truncation_redraws_only_large_entries_and_none_changes_nothing() -> None:
    z, y = E.eval_inputs(64, 500, 10, seed=3)
    zt, yt = E.eval_inputs(64, 500, 10, seed=3, truncation=0.5)
    assert torch.equal(E.eval_inputs(64, 500, 10, seed=3)[0], z)  # default stays untruncated
    assert torch.equal(y, yt)  # labels do not depend on t
    assert zt.abs().max() <= 0.5 and z.abs().max() > 2
    small = z.abs() <= 0.5
    assert torch.equal(zt[small], z[small])  # entries already inside t are kept
    assert float(zt.std()) < 0.35  # ~0.28 for N(0,1) truncated at 0.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--truncation"):
            E.check_truncation(bad, "--truncation")
    from sagan.visualize import fixed_z

    assert fixed_z(8, range(4), 0, truncation=1.0).abs().max() <= 1.0
    assert torch.equal(fixed_z(8, [2], 0), fixed_z(8, range(4), 0)[2:3])


def test_protocol_separates_what_makes_numbers_incomparable(inception_weights: Path) -> None:
    real = E.prepare_real([torch.zeros(4, 3, 8, 8, dtype=torch.uint8)], 4, 8)
    a = E.evaluation_protocol(["fid", "dc"], inception_weights, real, 32, 1000, seed=0)
    assert a["protocol.weights_fingerprint"] == E.weights_fingerprint(inception_weights)
    assert a["protocol.real_digest"] == real.source_id and a["protocol.real_count"] == "4"
    assert a["protocol.generated_count"] == "1000" and a["protocol.truncation"] == "none"
    assert a["protocol.library"].startswith("torch-fidelity ") and "prdc " in a[
        "protocol.library"]
    assert "299" in a["protocol.resize"]
    same = E.evaluation_protocol(["fid", "dc"], inception_weights, real, 32, 1000, seed=7,
                                 runtime="OpenVINO 2026.4.1 fp32")  # features equal to 1e-4
    assert same["protocol.runtime"] == "OpenVINO 2026.4.1 fp32" != a["protocol.runtime"]
    assert same["protocol.id"] == a["protocol.id"] and not E.comparable(a, same)
    other = E.evaluation_protocol(["fid", "dc"], inception_weights, real, 32, 5000,
                                  truncation=0.5)
    assert other["protocol.id"] != a["protocol.id"]
    assert E.comparable(a, other) == ["generated_count", "truncation"]


# --------------------------------------------------------------------------- standard features


@pytest.mark.slow
def test_precision_recall_density_coverage_on_the_standard_features(standard_features) -> None:
    """200 vs 200 Fashion-MNIST (k-NN balls are fewer than at 1,000, so real-vs-real P/R sit
    below 1: measured 0.82 / 0.75, density 1.09, coverage 0.985; docs/EVALUATION.md has the
    1,000 vs 1,000 values)."""
    def prdc_of(name: str) -> dict[str, float]:
        return E.scores(standard_features[name], standard_features["test"], ["prc", "dc"])

    real = prdc_of("train")
    assert real["precision"] > 0.7 and real["recall"] > 0.65, real
    assert 0.8 < real["density"] < 1.3 and real["coverage"] > 0.9, real
    collapsed = prdc_of("collapsed")
    assert collapsed["recall"] < 0.02 and collapsed["coverage"] < 0.02, collapsed
    noise = prdc_of("noise")
    assert noise["precision"] < 0.01 and noise["density"] < 0.01, noise
    blurred = prdc_of("blurred")
    assert blurred["precision"] < 0.5 * real["precision"], blurred
    assert blurred["recall"] < 0.5 * real["recall"], blurred


# --------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_evaluate_cli_prints_every_metric_with_the_protocol(
        tmp_path: Path, inception_weights: Path, grey_shards) -> None:  # noqa: F811
    ckpt = _checkpoint(tmp_path, "model.channels=1", "model.num_classes=3")
    out = tmp_path / "m.json"
    cmd = [sys.executable, "pipelines/evaluate.py", "--model", str(ckpt), "--data",
           grey_shards.location, "--num-samples", str(N), "--real-samples", str(N),
           "--batch-size", str(N), "--metrics", "fid,kid,prc,dc,ifid", "--truncation", "0.7",
           "--inception-weights", str(inception_weights), "--cache-dir",
           str(tmp_path / "cache"), "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    m = record["metrics"]
    assert {"fid", "kid", "precision", "recall", "density", "coverage", "ifid"} <= set(m)
    assert {k for k in m if k.startswith("ifid/")} == {"ifid/0", "ifid/1", "ifid/2"}
    assert all(math.isfinite(v) for v in m.values())
    assert 0 <= m["precision"] <= 1 and 0 <= m["coverage"] <= 1
    p = record["protocol"]
    assert p["protocol.truncation"] == "0.7" and p["protocol.real_count"] == str(N)
    assert p["protocol.real_digest"] == grey_shards.content_hash()[:16]
    printed = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert float(printed["recall"]) == pytest.approx(m["recall"], rel=1e-4)
    assert printed["protocol.id"] == p["protocol.id"]



def test_truncation_flags_refuse_bad_values_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import evaluate, sample, truncation_curve

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = str(_checkpoint(tmp_path))
    for main, argv in ((evaluate.main, ["--data", "x"]), (sample.main, ["--out", "g.png"])):
        assert main(["--model", ckpt, *argv, "--truncation", "-1", "--no-progress",
                     "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--truncation" in err, err
    with pytest.raises(SystemExit) as exc:
        truncation_curve.parse_args(["--model", ckpt, "--data", "x", "--out-dir", "d",
                                     "--truncations", "0.5,x"])
    assert exc.value.code == 2 and "--truncations" in capsys.readouterr().err


@pytest.mark.slow
def test_truncation_curve_writes_png_and_table(tmp_path: Path, inception_weights: Path,
                                               grey_shards) -> None:  # noqa: F811
    from PIL import Image

    ckpt = _checkpoint(tmp_path, "model.channels=1", "model.num_classes=3")
    cmd = [sys.executable, "pipelines/truncation_curve.py", "--model", str(ckpt), "--data",
           grey_shards.location, "--out-dir", str(tmp_path / "curve"), "--truncations",
           "0.5,1,none", "--num-samples", str(N), "--real-samples", str(N), "--batch-size",
           str(N), "--inception-weights", str(inception_weights), "--cache-dir",
           str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((tmp_path / "curve" / "truncation_curve.json").read_text())
    assert [r["truncation"] for r in table["rows"]] == [0.5, 1.0, None]
    assert all({"fid", "precision", "recall"} <= set(r) for r in table["rows"])
    assert len({r["fid"] for r in table["rows"]}) == 3  # t changes the samples
    assert "protocol.weights_fingerprint" in table["protocol"]
    csv_lines = (tmp_path / "curve" / "truncation_curve.csv").read_text().splitlines()
    assert csv_lines[0].startswith("truncation,fid") and csv_lines[-1].startswith("none,")
    with Image.open(tmp_path / "curve" / "truncation_curve.png") as img:
        assert img.size[0] > 500 and img.size[1] > 300


# --------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_protocol_and_per_class_ifid_reach_the_run_and_the_model_version(
        tmp_path: Path, inception_weights: Path, grey_shards,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A registered conditional generator evaluated through `models:/NAME/1` (sqlite MLflow,
    as tests/test_visualize.py): the run has the protocol as params, the metrics and the
    per-class iFID table; the version gets `eval.*` tags. Then the training path: the protocol
    as run tags (what train_loop sets) reaches the version's tags and description."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines import evaluate
    from pipelines.registry import describe_version, log_generator
    from sagan.models import Generator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        run_id = run.info.run_id
    cfg = load_config(None, ["model.g_ch=8", "model.d_ch=8", "model.image_size=32",
                             "model.g_attention=[16]", "model.d_attention=[]",
                             "model.channels=1", "model.num_classes=3"])
    torch.manual_seed(0)
    G = Generator(cfg.model)
    version = log_generator(uri, run_id, G.state_dict(), cfg.model, "tiny-gen", fid=1.0)
    argv = ["--model", f"models:/tiny-gen/{version}", "--data", grey_shards.location,
            "--num-samples", str(N), "--real-samples", str(N), "--batch-size", str(N),
            "--metrics", "fid,prc,ifid", "--inception-weights", str(inception_weights),
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", uri, "--experiment", "t",
            "--device", "cpu", "--no-progress"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    ev = [r for r in client.search_runs([exp]) if r.data.tags.get("sagan.kind") == "evaluation"]
    assert len(ev) == 1
    params, metrics = ev[0].data.params, ev[0].data.metrics
    assert params["protocol.weights_fingerprint"] == E.weights_fingerprint(inception_weights)
    assert params["protocol.real_count"] == str(N) and params["protocol.generated_count"] == str(N)
    assert {"fid", "precision", "recall", "ifid", "ifid.0", "ifid.2"} <= set(metrics)
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=ev[0].info.run_id, artifact_path="ifid_per_class.json",
        dst_path=str(tmp_path / "dl"))).read_text())
    assert [row[0] for row in table["data"]] == [0, 1, 2]
    assert table["data"][1][1] == pytest.approx(metrics["ifid.1"])
    tags = client.get_model_version("tiny-gen", version).tags
    assert tags["eval.protocol.id"] == params["protocol.id"]
    assert float(tags["eval.recall"]) == pytest.approx(metrics["recall"], rel=1e-5)

    # training: rank 0 sets the protocol as run tags, the driver describes the version
    protocol = {k: v for k, v in params.items() if k.startswith("protocol.")}
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in protocol.items()])
    scores = {"fid": 40.0, "kid": 0.01, "precision": 0.6, "recall": 0.4, "ifid": 50.0,
              "ifid/0": 45.0, "ifid/1": 50.0, "ifid/2": 55.0}
    describe_version(uri, "tiny-gen", version, cfg, 10, scores)
    mv = client.get_model_version("tiny-gen", version)
    assert "PRECISION 0.6" in mv.description and "RECALL 0.4" in mv.description
    assert "Intra-class FID per class: 0: 45, 1: 50, 2: 55" in mv.description
    assert f"id {params['protocol.id']}" in mv.description
    assert mv.tags["protocol.real_digest"] == grey_shards.content_hash()[:16]
    assert "ifid_per_class.json" in {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow
def test_in_training_evaluation_returns_the_protocol_and_logs_it_as_run_tags(
        tmp_path: Path, inception_weights: Path, grey_shards) -> None:  # noqa: F811
    """train_loop.evaluate (what every rank calls at an eval step) with the default metrics
    gives FID + KID only, the evaluation's seconds and the protocol; the tracking queue's
    set_tags puts the protocol on the run, where describe_version reads it."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipelines.config import load_run_config
    from pipelines.tracking_queue import TrackingQueue
    from pipelines.train_loop import evaluate
    from sagan.models import Generator

    cfg = load_run_config(None, ["model.g_ch=8", "model.d_ch=8", "model.image_size=32",
                                 "model.g_attention=[16]", "model.d_attention=[]",
                                 "model.channels=1", "model.num_classes=3",
                                 f"eval.num_samples={N}", f"eval.real_samples={N}",
                                 f"eval.batch_size={N}", f"eval.real_path={grey_shards.location}",
                                 f"eval.inception_weights={inception_weights}",
                                 f"eval.cache_dir={tmp_path / 'cache'}"])
    torch.manual_seed(0)
    scores, protocol = evaluate(SimpleNamespace(device=torch.device("cpu")), cfg,
                                Generator(cfg.model))
    assert set(scores) == {"fid", "kid", "kid_std", "eval_seconds"}
    assert protocol["protocol.generated_count"] == str(N)
    assert protocol["protocol.seed"] == str(cfg.train.seed)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)  # no process-wide tracking URI or active experiment
    run = client.create_run(client.create_experiment("protocol"))
    client.log_metric(run.info.run_id, "loss_d", 1.0, step=0)
    queue = TrackingQueue(uri, run.info.run_id, tmp_path / "spill")
    queue.set_tags(protocol)
    assert queue.close(wait_s=60)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["protocol.id"] == protocol["protocol.id"]
