"""Issue 5 end to end: `ray job submit ... pipelines/train.py` on a real local Ray cluster, shards
in a real S3 endpoint (SeaweedFS), a real MLflow server (sqlite) — all on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sagan.checkpoint import ema_weights
from tests.fixtures.sources import cifar10_tarball
from tests.fixtures.stack import (
    JOB_TINY,
    ROOT,
    runs_named,
    stop_job,
    submit_job,
    submitted_job_id,
)

pytestmark = pytest.mark.slow


def _client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.mlflow_uri)


def _latest_checkpoint(run_dir: Path) -> dict:
    from sagan.checkpoint import load_checkpoint

    ckpts = sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))
    assert ckpts, f"no checkpoints under {run_dir}"
    states = [load_checkpoint(p) for p in ckpts]
    return max(states, key=lambda s: s["step"])


def test_job_trains_logs_and_registers(local_stack, stack_shards, inception_weights, tmp_path):
    """The README's `ray job submit --working-dir . -- python pipelines/train.py --config
    configs/quickstart.yaml data.path=s3://$SAGAN_DATA_BUCKET/fashion-mnist-32` (a small model,
    the stack's bucket): the job trains, logs metrics, samples, FID and config to MLflow, and
    registers the EMA generator, which a fresh process loads and samples from."""
    storage = tmp_path / "runs"
    proc = submit_job(local_stack, [
        "pipelines/train.py", "--config", "configs/quickstart.yaml", *JOB_TINY,
        f"data.path={stack_shards}", "train.steps=12", "train.log_every=3", "train.ckpt_every=6",
        "train.sample_every=6",
        f"train.storage_path={storage}", "train.run_name=e2e",
        "tracking.registered_model=e2e-gen", "eval.eval_every=12", "eval.num_samples=20",
        "eval.real_samples=20", "eval.batch_size=10", "eval.metrics=[fid, kid]",
        f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}",
        f"eval.real_path={stack_shards}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "done: step 12/12" in out

    (run,) = runs_named(local_stack, "e2e")
    client = _client(local_stack)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12"
    assert run.data.params["model.g_attention"] == "[16]"
    assert run.data.params["data.path"] == stack_shards
    assert [m.step for m in client.get_metric_history(run_id, "loss_d")] == [3, 6, 9, 12]
    for key in ("loss_g", "d_real", "d_fake", "gamma.g_attn16", "gamma.d_attn16", "img_per_s",
                "skipped_samples"):
        assert len(client.get_metric_history(run_id, key)) == 4, key
    fid = client.get_metric_history(run_id, "fid")
    assert [m.step for m in fid] == [12] and fid[0].value > 0
    assert len(client.get_metric_history(run_id, "kid")) == 1
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "images"} <= artifacts
    # MLflow image logging: `images/<key>+step+<step>+...png` (key '/' stored as '~')
    images = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "images")
              if a.path.endswith(".png")]
    assert sorted((i.split("+")[0], int(i.split("+")[2])) for i in images) == [
        ("attention~16", 6), ("attention~16", 12), ("samples", 6), ("samples", 12)]

    version = client.get_model_version_by_alias("e2e-gen", "champion")  # first FID -> champion
    assert version.run_id == run_id and float(version.tags["fid"]) == pytest.approx(fid[0].value,
                                                                                     rel=1e-4)
    assert version.tags["step"] == "12"

    # A fresh process loads the registered model through MLflow and samples from it.
    code = ("import mlflow, torch; m = mlflow.pytorch.load_model('models:/e2e-gen@champion'); "
            "x = m(torch.randn(4, 32), torch.arange(4)); "
            "print(tuple(x.shape), float(x.min()) >= -1, float(x.max()) <= 1)")
    fresh = subprocess.run([sys.executable, "-c", code], env=local_stack.environ(),
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.strip().splitlines()[-1] == "(4, 1, 32, 32) True True"
    assert client.get_model_version_by_alias("e2e-gen", "latest").version == version.version

    # The weights MLflow holds are exactly the EMA weights of the last checkpoint.
    import mlflow

    mlflow.set_tracking_uri(local_stack.mlflow_uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/e2e-gen@latest",
                                                     dst_path=str(tmp_path / "model")))
    logged = torch.load(next(local.rglob("sagan_generator.pt")), weights_only=True)
    ckpt = _latest_checkpoint(storage / "e2e")
    assert ckpt["step"] == 12
    ema = ema_weights(ckpt)
    assert logged.keys() == ema.keys()
    for k in ema:
        assert torch.equal(logged[k], ema[k]), k


def test_stopped_job_resumes_to_exact_step_count(local_stack, stack_shards, tmp_path):
    storage = tmp_path / "runs"
    args = ["--config", "configs/quickstart.yaml", *JOB_TINY, f"data.path={stack_shards}",
            "train.steps=150", "train.log_every=10", "train.ckpt_every=10",
            "train.sample_every=0", f"train.storage_path={storage}",
            "train.run_name=e2e-resume", "tracking.registered_model=e2e-resume-gen"]
    proc = submit_job(local_stack, ["pipelines/train.py", *args], wait=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = submitted_job_id(proc)
    deadline = time.time() + 300
    while not list((storage / "e2e-resume").glob("checkpoint_*/checkpoint.pt")):
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    stop_job(local_stack, job_id)
    stopped_at = _latest_checkpoint(storage / "e2e-resume")["step"]
    assert 10 <= stopped_at < 150

    again = submit_job(local_stack, ["pipelines/train.py", *args])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resumed from" in out and "done: step 150/150" in out
    assert _latest_checkpoint(storage / "e2e-resume")["step"] == 150

    runs = runs_named(local_stack, "e2e-resume")
    assert len(runs) == 1  # one MLflow run across the restart
    steps = [m.step for m in _client(local_stack).get_metric_history(runs[0].info.run_id,
                                                                     "loss_d")]
    assert steps == list(range(10, 151, 10))  # one continuous history, no duplicates


def test_preflight_errors_are_clear_and_early(local_stack, stack_shards):
    env = local_stack.environ()

    def run(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "pipelines/train.py", *args],
                              env={**env, **(extra_env or {})}, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)

    bad_cfg = run("model.g_attention=[64]")
    assert bad_cfg.returncode == 2
    assert bad_cfg.stderr.strip().splitlines()[-1].startswith(
        "error: config field 'model.g_attention'")

    no_mlflow = run(*JOB_TINY, f"data.path={stack_shards}", "--tracking-uri",
                    "http://127.0.0.1:9")
    assert no_mlflow.returncode == 2
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in no_mlflow.stderr

    missing = run(*JOB_TINY, f"data.path=s3://{local_stack.bucket}/no-such-prefix")
    assert missing.returncode == 2
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.path 's3://") and "no-such-prefix" in last

    too_many = run(*JOB_TINY, f"data.path={stack_shards}", "--workers", "16",
                   "train.batch_size=64", "--run-name", "too-many")
    assert too_many.returncode == 2
    assert "cluster.workers=16" in too_many.stderr and "free" in too_many.stderr
    assert not runs_named(local_stack, "too-many")  # nothing was created in MLflow


def test_readme_sagan32_two_workers(local_stack, tmp_path):
    """The README's `python pipelines/train.py --config configs/sagan32.yaml train.steps=5000
    --workers 2` as a driver on the stack's cluster (RAY_ADDRESS), made small: 2 steps of a
    width-8 model on CPU workers (--gpus-per-worker 0) over CIFAR-10-format shards in S3."""
    from sagan.data import prepare_dataset

    url = f"s3://{local_stack.bucket}/cifar10-32"
    cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", per_batch=8)
    env = local_stack.environ()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        prepare_dataset(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}", url,
                        endpoint_url=local_stack.s3_endpoint)
    proc = subprocess.run(
        [sys.executable, "pipelines/train.py", "--config", "configs/sagan32.yaml",
         "train.steps=5000", "--workers", "2", "train.steps=2", "--gpus-per-worker", "0",
         f"data.path={url}", "model.g_ch=8", "model.d_ch=8", "model.z_dim=32",
         "train.batch_size=8", "data.loader_workers=1", "train.log_every=1",
         "train.sample_every=0", "eval.eval_every=0", f"train.storage_path={tmp_path / 'runs'}",
         "train.run_name=readme-sagan32", "--no-register"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "done: step 2/2" in out and "world_rank=1" in out
    (run,) = runs_named(local_stack, "readme-sagan32", experiment="sagan32")
    assert run.data.params["model.image_size"] == "32" and run.data.params["model.channels"] \
        == "3"
