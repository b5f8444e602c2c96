"""Issue 17: the README's embedded default on a fresh copy of the repo, and errors that no retry
can fix ending the run at once.

`python pipelines/train.py` with no stack and no RAY_ADDRESS / MLFLOW_TRACKING_URI starts its own
Ray, prepares the shards on first use, trains, writes its MLflow run into ./mlruns and registers
the model; it does the same while an unrelated Ray cluster runs on the machine, and never joins
that cluster. Relative paths are resolved where the command runs (Ray Train V2 runs workers in
another directory), and refused on a multi-node cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import load_run_config
from pipelines.preflight import (
    PreflightError,
    absolute_tracking_uri,
    localize_paths,
    refuse_relative_on_many_nodes,
)
from tests.fixtures.stack import ROOT

# Small enough for 2 cores: the quickstart config (2 workers) at width 8.
SMALL = ["model.g_ch=8", "model.d_ch=8", "train.batch_size=8", "train.log_every=2",
         "train.ckpt_every=2", "train.sample_every=4", "data.shuffle_buffer=50",
         "eval.eval_every=0"]
# Variables that would point the embedded default at another cluster or MLflow server.
FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")

# A second Ray cluster (head + one worker node) in its own process, as another user's would be.
OTHER_CLUSTER = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address}), flush=True)
for line in sys.stdin:  # "jobs": how many drivers have ever connected (this one included)
    if line.strip() == "jobs":
        print(json.dumps({"jobs": len(ray._private.state.jobs())}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def fresh_copy(dest: Path) -> Path:
    """The repo's tracked and not-ignored files, as a fresh clone has them (no data, runs,
    mlruns, .state or .venv)."""
    if (ROOT / ".git").exists():
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", ".state", "data", "runs", "mlruns", "__pycache__"))
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    # the copy's code, not the editable install's (which points at this checkout)
    env["PYTHONPATH"] = extra.pop("PYTHONPATH")
    return {**env, "RAY_DEDUP_LOGS": "0", **extra}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- unit


def test_local_paths_become_absolute_and_relative_ones_are_named(tmp_path: Path) -> None:
    cfg = load_run_config("configs/quickstart.yaml", [
        "data.prepare_source=mnist:raw/mnist", "eval.inception_weights=w/inception.pth",
        "cluster.storage_path=s3://bucket/runs"])
    out, relative = localize_paths(cfg, cwd=tmp_path)
    assert out.data.path == str(tmp_path / "data" / "fashion-mnist-32")
    assert out.data.prepare_source == f"mnist:{tmp_path / 'raw' / 'mnist'}"
    assert out.eval.inception_weights == str(tmp_path / "w" / "inception.pth")
    assert out.eval.cache_dir == str(Path("~/.cache/sagan/fidelity").expanduser())
    assert out.cluster.storage_path == "s3://bucket/runs"  # URLs pass unchanged
    assert cfg.data.path == "data/fashion-mnist-32"  # the input is not modified
    assert out.eval.real_path == str(tmp_path / "data" / "fashion-mnist-32-test")
    assert [f for f, _ in relative] == ["data.path", "data.prepare_source", "eval.real_path",
                                        "eval.inception_weights"]
    # a run that never evaluates reads no eval path: made absolute, not reported as relative
    quiet, unread = localize_paths(load_run_config("configs/quickstart.yaml", [
        "eval.eval_every=0", "data.path=s3://b/d", "cluster.storage_path=s3://b/r"]),
        cwd=tmp_path)
    assert unread == [] and quiet.eval.real_path == str(tmp_path / "data/fashion-mnist-32-test")
    assert absolute_tracking_uri("sqlite:///mlruns/m.db", tmp_path) == \
        f"sqlite:///{tmp_path}/mlruns/m.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    refuse_relative_on_many_nodes(relative, 1)
    with pytest.raises(PreflightError) as info:
        refuse_relative_on_many_nodes(relative, 3)
    assert str(info.value).startswith("data.path 'data/fashion-mnist-32' is a relative local "
                                      "path and the Ray cluster has 3 nodes")


def test_setup_errors_are_final_storage_outages_are_not() -> None:
    from pipelines.train_loop import _setup_error
    from sagan.checkpoint import CheckpointError
    from sagan.config import ConfigError
    from sagan.data import DataError, StorageUnreachable

    cfg = load_run_config(None, ["data.path=s3://b/x"])
    assert _setup_error(DataError("no manifest.json at s3://b/x"), cfg) == \
        "data.path 's3://b/x': no manifest.json at s3://b/x"
    assert _setup_error(CheckpointError("checkpoint c: 'G' weights do not match"), cfg)
    assert _setup_error(ConfigError("config field 'x': bad"), cfg)
    assert _setup_error(StorageUnreachable("storage unreachable for 21s"), cfg) is None
    assert _setup_error(OSError("connection reset"), cfg) is None


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_worker_side_missing_manifest_stops_at_once_in_one_line(tmp_path: Path) -> None:
    """Workers that find no manifest (the data vanished after the driver's check, or a node
    lacks the path) end the run in the first worker group with one line and exit code 2,
    instead of train.max_failures retries. The driver's own data check is skipped on purpose:
    the test drives the TorchTrainer step directly."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    code = f"""
import sys
from pipelines.ray_cluster import connect
from pipelines.config import load_run_config
from pipelines.driver import TrainingStopped, fit

cfg = load_run_config("configs/quickstart.yaml", {[*SMALL, f"data.path={empty}",
                                              f"train.storage_path={tmp_path / 'runs'}",
                                              "train.run_name=no-manifest"]!r})
connect()
try:
    fit(cfg, None, None)
except TrainingStopped as exc:
    print(f"error: {{exc}}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""
    proc = run(["-c", code], ROOT, clean_env(PYTHONPATH=str(ROOT)), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.path '{empty}': no manifest.json at {empty}"), last
    assert out.count("Started training worker group") == 1, out[-4000:]  # not retried
    assert out.count("[rank 0] started") == 1


@pytest.mark.slow
def test_readme_embedded_default_on_a_fresh_copy(tmp_path: Path, inception_weights: Path
                                                 ) -> None:
    """README commands run here, in a fresh copy of the repo with no stack:
    `python pipelines/train.py` (small overrides), then
    `python pipelines/evaluate.py --model models:/sagan-fashion-quickstart@latest --data
    data/fashion-mnist-32-test --num-samples 5000 --out metrics.json` (fewer samples, offline
    weights) and `python pipelines/sample.py --model runs/quickstart/checkpoint_XXX/checkpoint.pt
    --out grid.png --attention-out attention.png --query 8,8 --query 20,12`; then the first
    command once more while another (two-node) Ray cluster is up, which it must not join; and a
    relative data path on that two-node cluster is refused in one line."""
    from mlflow.tracking import MlflowClient

    repo = fresh_copy(tmp_path / "repo")
    env = clean_env(PYTHONPATH=str(repo))
    # FID on (random-init Inception: this test checks the wiring, not the value)
    evals = ["eval.eval_every=4", "eval.num_samples=20", "eval.real_samples=20",
             "eval.batch_size=10", "eval.metrics=[fid]",
             f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}"]
    first = run(["pipelines/train.py", "train.steps=4", *SMALL, *evals], repo, env)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-5000:]
    assert "training on an embedded local Ray" in out and "done: step 4/4" in out
    assert (repo / "data" / "fashion-mnist-32" / "manifest.json").is_file()  # first use
    # and the held-out set FID is measured against: the test split, prepared on first use
    heldout = json.loads((repo / "data" / "fashion-mnist-32-test" / "manifest.json").read_text())
    assert heldout["total"] == 10000
    uri = f"sqlite:///{repo}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    latest = lambda: str(client.get_model_version_by_alias(  # noqa: E731
        "sagan-fashion-quickstart", "latest").version)
    assert latest() == "1"
    (run_info,) = client.search_runs(
        [client.get_experiment_by_name("sagan-quickstart").experiment_id])
    assert run_info.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "loss_d")] == [2, 4]
    (fid,) = client.get_metric_history(run_info.info.run_id, "fid")
    assert fid.step == 4 and fid.value > 0
    champion = client.get_model_version_by_alias("sagan-fashion-quickstart", "champion")
    assert str(champion.version) == "1" and float(champion.tags["fid"]) == pytest.approx(fid.value)

    evaluated = run(["pipelines/evaluate.py", "--model", "models:/sagan-fashion-quickstart@latest",
                     "--data", "data/fashion-mnist-32-test", "--num-samples", "5000",
                     "--out", "metrics.json", "--num-samples", "20", "--real-samples", "20",
                     "--batch-size", "10", "--inception-weights", str(inception_weights),
                     "--cache-dir", str(tmp_path / "fid"), "--no-progress"], repo, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((repo / "metrics.json").read_text())["metrics"]["fid"] > 0
    ckpt = sorted((repo / "runs" / "quickstart").glob("checkpoint_*/checkpoint.pt"))[-1]
    sampled = run(["pipelines/sample.py", "--model", str(ckpt.relative_to(repo)), "--out",
                   "grid.png", "--attention-out", "attention.png", "--query", "8,8", "--query",
                   "20,12", "--no-progress"], repo, env)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (repo / "grid.png").stat().st_size > 0 and (repo / "attention.png").stat().st_size > 0

    other = subprocess.Popen([sys.executable, "-c", OTHER_CLUSTER], cwd=tmp_path, text=True,
                             env={**env, "RAY_AUTH_MODE": "disabled"}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert other.stdin is not None and other.stdout is not None
        address = json.loads(other.stdout.readline())["address"]
        again = run(["pipelines/train.py", "train.steps=6", *SMALL], repo, env)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out[-5000:]
        assert "training on an embedded local Ray" in out and "done: step 6/6" in out
        assert "resumed from" in out and "Found multiple active Ray instances" not in out
        other.stdin.write("jobs\n")
        other.stdin.flush()
        assert json.loads(other.stdout.readline())["jobs"] == 1  # only its own driver

        refused = run(["pipelines/train.py", "train.steps=6", *SMALL], repo,
                      {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode == 2, (refused.stdout + refused.stderr)[-3000:]
        assert refused.stderr.strip().splitlines()[-1].startswith(
            "error: data.path 'data/fashion-mnist-32' is a relative local path and the Ray "
            "cluster has 2 nodes")
    finally:
        if other.stdin is not None:
            other.stdin.close()
        other.wait(timeout=120)
    assert latest() == "2"
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "loss_d")] == \
        [2, 4, 6]  # the same MLflow run, continued
