"""Issue 9: secrets never reach MLflow or any log; local services listen on loopback only; an S3
outage during data reads does not stop a `ray job submit` training job.

Why a second stack here: credentials reach a Ray job through the environment of the Ray nodes
(an instance profile, or a Kubernetes Secret in the pod spec), not through `--runtime-env-json`
(Ray writes runtime_env env_vars in clear text to its runtime_env_agent.log and keeps them in the
job's metadata; docs/RELIABILITY.md). So this module starts its own stack whose services were
*born* with sentinel credentials (unique per run, generated here, so they appear in no file of
the repository), submits one real training job to it, and then scans everything: every MLflow
param, tag, metric name, artifact byte and registered-model field, the job logs, the submit
output, the checkpoints, and every log file of the stack (MLflow, moto, the whole Ray session
directory). The same job reads its shards through a TCP proxy that drops S3 for 5 s mid-run.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.local import services as services_mod
from infra.local import stack as stack_mod
from infra.local.config import StackConfig
from tests.fixtures.s3 import TcpProxy
from tests.fixtures.stack import JOB_TINY, ROOT, runs_named, submit_job, submitted_job_id

STEPS, CKPT_EVERY, LOG_EVERY, OUTAGE_S = 80, 20, 10, 5.0

pytestmark = pytest.mark.slow


def _sentinels() -> dict[str, str]:
    """Credential-shaped values no one else could produce (moto and an auth-less MLflow server
    accept anything)."""
    tag = uuid.uuid4().hex
    return {"AWS_ACCESS_KEY_ID": f"AKIA{tag[:16].upper()}",
            "AWS_SECRET_ACCESS_KEY": f"sentinelSecret{tag}",
            "AWS_SESSION_TOKEN": f"sentinelSession{tag}",
            "MLFLOW_TRACKING_TOKEN": f"sentinelMlflowToken{tag}"}


@dataclass
class SecretRun:
    stack: stack_mod.StackInfo
    secrets: dict[str, str]
    storage: Path
    job_id: str
    status: str
    submit_output: str
    job_logs: str
    proxy: TcpProxy
    bytes_before_cut: int
    bytes_after_cut_end: int
    run_id: str


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretRun]:
    """A stack started with sentinel credentials, and one training job on it, submitted with
    `ray job submit` (no credentials in its runtime env), whose shard reads go through a proxy
    that is cut for OUTAGE_S seconds once the first checkpoint exists."""
    secrets = _sentinels()
    state = tmp_path_factory.mktemp("secret_stack")
    cfg = StackConfig.with_free_ports(state, ray_num_cpus=4, ray_object_store_mb=512)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setitem(services_mod.DEV_CREDENTIALS, key, secrets[key])
        for key in ("AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN"):
            mp.setenv(key, secrets[key])  # inherited by the services started now
        info = stack_mod.up(cfg, quiet=True)
    proxy = None
    try:
        env = {**info.environ(), "AWS_SESSION_TOKEN": secrets["AWS_SESSION_TOKEN"],
               "MLFLOW_TRACKING_TOKEN": secrets["MLFLOW_TRACKING_TOKEN"]}
        assert env["AWS_SECRET_ACCESS_KEY"] == secrets["AWS_SECRET_ACCESS_KEY"]
        url = f"s3://{info.bucket}/fashion-secrets"
        prep = subprocess.run(
            [sys.executable, "pipelines/prepare_data.py", "fashion-mnist", url, "--limit", "600",
             "--samples-per-shard", "100", "--no-progress"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert prep.returncode == 0, prep.stderr[-3000:]

        host, port = info.s3_endpoint.split("://", 1)[1].rsplit(":", 1)
        proxy = TcpProxy(host, int(port))
        storage = tmp_path_factory.mktemp("secret_runs")
        submit = submit_job(info, [
            "pipelines/train.py", "--config", "configs/quickstart.yaml", *JOB_TINY,
            f"data.path={url}", f"data.endpoint_url={proxy.endpoint_url}",
            f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
            f"train.ckpt_every={CKPT_EVERY}", f"train.sample_every={STEPS // 2}",
            f"train.storage_path={storage}", "train.run_name=secrets",
            "tracking.registered_model=secrets-gen"], wait=False, timeout=300, env=env)
        submit_out = submit.stdout + submit.stderr
        assert submit.returncode == 0, submit_out[-3000:]
        job_id = submitted_job_id(submit)

        deadline = time.monotonic() + 300
        while not list((storage / "secrets").glob("checkpoint_*/checkpoint.pt")):
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        before = proxy.bytes_down
        proxy.cut(OUTAGE_S)  # S3 unreachable for the data reads, mid-training
        time.sleep(OUTAGE_S)
        assert proxy.bytes_down == before  # nothing got through during the outage
        status = _wait_job(info, job_id, timeout=400)
        after = proxy.bytes_down
        logs = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "logs",
                               "--address", info.ray_address, job_id], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        (run,) = runs_named(info, "secrets")
        yield SecretRun(info, secrets, storage, job_id, status, submit_out,
                        logs.stdout + logs.stderr, proxy, before, after, run.info.run_id)
    finally:
        if proxy is not None:
            proxy.close()
        leftovers = stack_mod.down(state, purge=True, quiet=True)
        assert not any(leftovers.values()), leftovers


def _wait_job(info: stack_mod.StackInfo, job_id: str, timeout: float) -> str:
    """Final status of the job (SUCCEEDED / FAILED / STOPPED), polled over the job API."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(info.ray_address, headers=info.ray_headers())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(1)
    pytest.fail(f"job {job_id} not finished within {timeout} s")


# --------------------------------------------------------------------------- outage


def test_s3_outage_during_data_reads_training_continues(secret_run):
    """The shard reads' endpoint was unreachable for 5 s in the middle of training: the loader
    retried (counted in the data_retries metric), reads resumed through the same endpoint, and
    the job finished at exactly train.steps with a complete metric history."""
    assert secret_run.status == "SUCCEEDED", secret_run.job_logs[-4000:]
    assert f"done: step {STEPS}/{STEPS}" in secret_run.job_logs
    assert secret_run.proxy.cuts == 1
    assert secret_run.bytes_after_cut_end > secret_run.bytes_before_cut  # reads came back
    from mlflow.tracking import MlflowClient

    client = MlflowClient(secret_run.stack.mlflow_uri)
    steps = [m.step for m in client.get_metric_history(secret_run.run_id, "loss_d")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    retries = client.get_metric_history(secret_run.run_id, "data_retries")
    assert max(m.value for m in retries) > 0  # the outage was hit, and ridden out
    skipped = client.get_metric_history(secret_run.run_id, "skipped_shards")
    print(f"\ns3 outage: {max(m.value for m in retries):.0f} data retries, "
          f"{max(m.value for m in skipped):.0f} skipped shard reads, run finished")
    assert "retrying s3://" in secret_run.job_logs


# --------------------------------------------------------------------------- secrets


def _hits(blob: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in blob]


def _context(blob: bytes, secrets: dict[str, str], width: int = 160) -> str:
    """The text around the first sentinel found, the sentinel itself masked."""
    for value in secrets.values():
        i = blob.find(value.encode())
        if i >= 0:
            text = blob[max(0, i - width):i + len(value) + width].decode(errors="replace")
            for n, v in secrets.items():
                text = text.replace(v, f"<{n}>")
            return text
    return ""


def _mlflow_texts(uri: str, tmp: Path) -> dict[str, bytes]:
    """Everything the MLflow server holds for us, as named byte strings: experiments, every run
    (params, tags, metric names, run name), every artifact file, every logged model (its
    params, tags and files), registered models, versions and aliases."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    out: dict[str, bytes] = {}
    for exp in client.search_experiments():
        out[f"experiment {exp.name}"] = repr((exp.name, exp.tags, exp.artifact_location)).encode()
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            out[f"run {rid} params"] = json.dumps(run.data.params).encode()
            out[f"run {rid} tags"] = json.dumps(run.data.tags).encode()
            out[f"run {rid} metrics"] = json.dumps(sorted(run.data.metrics)).encode()
            out[f"run {rid} info"] = repr(run.info).encode()
            local = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="",
                                                             dst_path=str(tmp / rid)))
            files = [p for p in local.rglob("*") if p.is_file()]
            assert files, f"run {rid} has no artifacts to scan"
            for p in files:
                out[f"run {rid} artifact {p.relative_to(local)}"] = p.read_bytes()
        # MLflow 3 keeps logged models (MLmodel, weights, environment files) apart from runs
        for lm in client.search_logged_models([exp.experiment_id]):
            out[f"logged model {lm.model_id}"] = json.dumps(lm.to_dictionary(),
                                                            default=str).encode()
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=lm.artifact_location, dst_path=str(tmp / lm.model_id)))
            for p in (q for q in local.rglob("*") if q.is_file()):
                out[f"logged model {lm.model_id} artifact {p.relative_to(local)}"] = \
                    p.read_bytes()
    for rm in client.search_registered_models():
        out[f"model {rm.name}"] = repr((rm.name, rm.tags, rm.description, rm.aliases)).encode()
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            out[f"model {rm.name} v{mv.version}"] = repr(
                (mv.tags, mv.description, mv.source, mv.run_link, mv.run_id)).encode()
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_secrets_never_reach_mlflow_or_logs(secret_run, tmp_path):
    """Sentinel AWS keys, session token and MLflow token were in the environment of every
    process of the job and of the stack's servers (they were used: the job read S3 and logged
    to MLflow, the MLflow server stored artifacts in S3), and a user then sampled from the
    registered model with pipelines/sample.py (an artifact download). None of the sentinels
    appears in anything logged or written anywhere by the job, the user's client or the
    stack."""
    assert secret_run.status == "SUCCEEDED", secret_run.job_logs[-4000:]
    secrets = secret_run.secrets
    env = {**secret_run.stack.environ(), **secrets}
    env.pop("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", None)  # the pipeline's own default
    sample = subprocess.run(
        [sys.executable, "pipelines/sample.py", "--model", "models:/secrets-gen@latest",
         "--out", str(tmp_path / "grid.png"), "--n-per-class", "1", "--device", "cpu"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    scanned = {"ray job submit output": secret_run.submit_output.encode(),
               "ray job logs": secret_run.job_logs.encode(),
               "sample.py output": (sample.stdout + sample.stderr).encode()}
    # Log files first: the downloads below must not be what ends up in the servers' logs.
    scanned.update(_files(secret_run.stack.state_dir / "logs"))  # MLflow, moto, ray start
    ray_tmp = Path(str(secret_run.stack.config.ray_temp_dir))
    scanned.update(_files(ray_tmp / "session_latest" / "logs"))  # every Ray process' log
    scanned.update(_files(secret_run.storage))  # checkpoints carry the config
    scanned.update(_mlflow_texts(secret_run.stack.mlflow_uri, tmp_path))
    artifacts = [k for k in scanned if " artifact " in k]
    assert any(k.endswith("config.yaml") for k in artifacts)
    assert any("samples/" in k for k in artifacts) and any("MLmodel" in k for k in artifacts)
    assert any("job-driver" in k for k in scanned)  # the Ray session logs were read

    leaks = {name: _hits(blob, secrets) for name, blob in scanned.items()}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, f"secrets found in: {leaks}; e.g. " + " | ".join(
        _context(scanned[k], secrets) for k in list(leaks)[:3])
    print(f"\nsecrets scan: {len(scanned)} sources, "
          f"{sum(len(b) for b in scanned.values()) / 1e6:.1f} MB, no sentinel found")


# --------------------------------------------------------------------------- exposure


def _listeners() -> dict[int, set[str]]:
    """port -> addresses listening on it (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    out: dict[int, set[str]] = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, struct.pack("<I", int(hexaddr, 16)))
            else:
                addr = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1]
                                                         for i in range(0, 16, 4)))
            out.setdefault(int(hexport, 16), set()).add(addr)
    return out


def test_local_services_listen_on_loopback_only(local_stack):
    """MLflow, S3 and the Ray dashboard/job API of the local stack accept connections from this
    machine only, and the job API refuses a request without Ray's auth token. (Ray's own gRPC
    ports listen on all interfaces whatever --dashboard-host says; token auth is what guards
    them; docs/RELIABILITY.md.)"""
    cfg = local_stack.config
    listening = _listeners()
    for name, port in (("s3", cfg.s3_port), ("mlflow", cfg.mlflow_port),
                       ("ray dashboard/jobs", cfg.ray_dashboard_port)):
        assert listening.get(port) == {"127.0.0.1"}, (name, port, listening.get(port))
    assert local_stack.env["RAY_AUTH_MODE"] == "token"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{local_stack.ray_address}/api/jobs/", timeout=10)
    assert info.value.code == 401
