"""Issue 18: the local stack's S3 is a real, persistent object store, and nothing is lost.

Real server (SeaweedFS, as `infra/local/up` runs it), real MLflow, real Ray, on a stack of this
module's own (it is taken down and up, and its S3 server is SIGKILLed):
- a model trained and registered through the stack, then `down` + `up`: it loads from
  `models:/…@latest` and samples, the shards stream again without re-preparing, and every MLflow
  artifact reads back byte for byte;
- the S3 server SIGKILLed while a shard prefix is written, and while a checkpoint uploads (a
  proxy freezes the upload half-way, so the server dies holding a partial body): after a
  restart no partial object is visible, re-running the writer completes the prefix, and
  training resumes from the last complete checkpoint;
- whatever starts a server (the benchmark, the pytest fixtures, `up`) stops it when it is
  itself stopped with SIGTERM;
- a state dir of the moto-era stack gets one line saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.local.config import StackConfig
from infra.local.processes import proc_stat, read_pid_records
from infra.local.services import s3_client
from infra.local.stack import StackInfo, down, up
from sagan.checkpoint import load_checkpoint
from tests.fixtures.s3 import StallProxy
from tests.fixtures.stack import (
    JOB_TINY,
    ROOT,
    TEST_RAY_CPUS,
    run_driver,
    start_driver,
    submit_job,
)

PY = sys.executable
TINY = [*JOB_TINY, "train.sample_every=0"]


@dataclass
class Persist:
    """This module's stack; `info` changes when the stack is restarted."""

    cfg: StackConfig
    info: StackInfo
    shards: str = ""

    def restart_dead_services(self) -> None:
        self.info = up(self.cfg, quiet=True)

    def kill_s3(self) -> None:
        """SIGKILL the S3 server's process group and wait until it is gone."""
        rec = read_pid_records(self.cfg.state_dir)["s3"]
        os.killpg(rec.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while rec.members() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not rec.members()

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.info.environ())
        return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, **kw)


@pytest.fixture(scope="module")
def persist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Persist]:
    state = tmp_path_factory.mktemp("persist_stack")
    cfg = StackConfig.with_free_ports(state, ray_num_cpus=TEST_RAY_CPUS, ray_object_store_mb=512)
    stack = Persist(cfg, up(cfg, quiet=True))
    try:
        url = f"s3://{cfg.bucket}/fashion-persist"
        prep = stack.run(["pipelines/prepare_data.py", "fashion-mnist", url, "--limit", "600",
                          "--samples-per-shard", "100", "--no-progress"])
        assert prep.returncode == 0, prep.stderr[-3000:]
        stack.shards = url
        yield stack
    finally:
        leftovers = down(state, purge=True, quiet=True)
        assert not any(leftovers.values()), leftovers


@pytest.fixture
def proxy(persist: Persist) -> Iterator[StallProxy]:
    persist.restart_dead_services()  # a test that failed before its restart must not fail the next
    host, port = persist.cfg.s3_endpoint.split("://", 1)[1].rsplit(":", 1)
    p = StallProxy(host, int(port))
    yield p
    p.close()


def _objects(stack: Persist, prefix: str) -> dict[str, dict]:
    client = s3_client(stack.cfg)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.cfg.bucket,
                                                              Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _mlflow_artifacts(uri: str, dst: Path) -> dict[str, str]:
    """sha256 of every artifact file of every run and logged model on the server."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    out: dict[str, str] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="",
                                                      dst_path=str(dst / run.info.run_id))
            out.update({f"run {run.info.run_id}/{k}": v for k, v in _digests(Path(got)).items()})
        for lm in client.search_logged_models([exp.experiment_id]):
            got = mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location,
                                                      dst_path=str(dst / lm.model_id))
            out.update({f"model {lm.model_id}/{k}": v for k, v in _digests(Path(got)).items()})
    return out


# --------------------------------------------------------------------------- down, up


@pytest.mark.slow
def test_model_shards_and_artifacts_survive_down_and_up(persist: Persist, tmp_path: Path):
    """Train and register through the stack, `down`, `up`: the registered model loads from
    models:/…@latest and samples, the shards stream without re-preparing (same objects, same
    timestamps), every MLflow artifact and checkpoint reads back byte for byte."""
    name = "persist-gen"
    job = submit_job(persist.info, [
        "pipelines/train.py", "--config", "configs/quickstart.yaml", *JOB_TINY,
        f"data.path={persist.shards}", "train.steps=10", "train.log_every=5",
        "train.ckpt_every=10", "train.sample_every=10", "train.run_name=persist",
        f"train.storage_path=s3://{persist.cfg.bucket}/persist-ckpt",
        f"tracking.registered_model={name}"])
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    shards_before = {k: (o["ETag"], o["LastModified"])
                     for k, o in _objects(persist, "fashion-persist/").items()}
    ckpts_before = {k: o["ETag"] for k, o in _objects(persist, "persist-ckpt/").items()}
    artifacts_before = _mlflow_artifacts(persist.info.mlflow_uri, tmp_path / "before")
    assert any(k.endswith("MLmodel") for k in artifacts_before), sorted(artifacts_before)
    assert any("images/samples+" in k for k in artifacts_before)  # mlflow.log_image(key=)

    old_pids = dict(persist.info.pids)
    assert down(persist.cfg.state_dir, quiet=True) == {s: [] for s in old_pids}
    assert all(proc_stat(pid) is None for pid in old_pids.values())
    assert any((persist.cfg.state_dir / "s3" / "data").iterdir())  # the objects stayed
    persist.restart_dead_services()
    assert set(persist.info.pids.values()).isdisjoint(old_pids.values())

    sample = persist.run(["pipelines/sample.py", "--model", f"models:/{name}@latest",
                          "--out", str(tmp_path / "grid.png"), "--n-per-class", "1",
                          "--device", "cpu"])
    assert sample.returncode == 0, sample.stderr[-3000:]
    from PIL import Image

    assert min(Image.open(tmp_path / "grid.png").size) >= 32

    after = {k: (o["ETag"], o["LastModified"])
             for k, o in _objects(persist, "fashion-persist/").items()}
    assert after == shards_before  # not re-prepared: the very same objects
    stream = persist.run(["-c", "import sys; from sagan.data import eval_loader\n"
                          "print(sum(len(y) for _, y in eval_loader(sys.argv[1], 100)))",
                          persist.shards])
    assert stream.returncode == 0 and stream.stdout.split()[-1] == "600", stream.stderr[-2000:]
    assert {k: o["ETag"] for k, o in _objects(persist, "persist-ckpt/").items()} == ckpts_before
    assert _mlflow_artifacts(persist.info.mlflow_uri, tmp_path / "after") == artifacts_before
    print(f"\nafter down/up: {len(artifacts_before)} MLflow artifact files, "
          f"{len(shards_before)} shard objects, {len(ckpts_before)} checkpoint objects intact")


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_s3_killed_while_a_shard_prefix_is_written(persist: Persist, proxy: StallProxy,
                                                   tmp_path: Path):
    """The server dies (SIGKILL) holding half of the 4th shard's body: after a restart only
    complete shards are listed (byte-identical to the same shards written locally), no
    manifest, and running the same writer again completes the prefix."""
    local = tmp_path / "ref"
    prep = ["pipelines/prepare_data.py", "fashion-mnist", "--limit", "1000",
            "--samples-per-shard", "100", "--no-progress"]
    ref = persist.run([*prep[:2], str(local), *prep[2:]])
    assert ref.returncode == 0, ref.stderr[-3000:]
    shard = (local / "train-000000.tar").stat().st_size
    proxy.stall_upload_after(int(3.5 * shard))
    url = f"s3://{persist.cfg.bucket}/killed-prefix"
    writer = subprocess.Popen([PY, *prep[:2], url, *prep[2:], "--endpoint-url",
                               proxy.endpoint_url], cwd=ROOT, env=persist.info.environ(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proxy.stalled.wait(240), writer.communicate(timeout=60)[0][-3000:]
    persist.kill_s3()
    proxy.release()
    out = writer.communicate(timeout=300)[0]
    assert writer.returncode != 0, out[-3000:]  # it could not finish, and said so in a line
    assert out.strip().splitlines()[-1].startswith("error: "), out[-3000:]
    persist.restart_dead_services()

    listed = _objects(persist, "killed-prefix/")
    names = sorted(k.split("/", 1)[1] for k in listed)
    assert "manifest.json" not in names and 1 <= len(names) < 10, names
    client = s3_client(persist.cfg)
    for key in listed:  # whatever is visible is complete
        body = client.get_object(Bucket=persist.cfg.bucket, Key=key)["Body"].read()
        assert body == (local / key.split("/", 1)[1]).read_bytes(), key

    again = persist.run([*prep[:2], url, *prep[2:]])
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads(client.get_object(Bucket=persist.cfg.bucket,
                                            Key="killed-prefix/manifest.json")["Body"].read())
    assert manifest["total"] == 1000 and len(manifest["shards"]) == 10
    for s in manifest["shards"]:
        body = client.get_object(Bucket=persist.cfg.bucket,
                                 Key=f"killed-prefix/{s['name']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == s["sha256"]
    print(f"\nS3 killed mid-shard: {len(names)} complete shards visible, writer exit "
          f"{writer.returncode}; re-run completed 10/10")


@pytest.mark.slow
def test_s3_killed_while_a_checkpoint_uploads(persist: Persist, proxy: StallProxy,
                                              tmp_path: Path):
    """Checkpoints go to s3:// through a proxy that freezes half-way through the second
    checkpoint's upload; the S3 server is SIGKILLed in that state and stays down until the
    run has ended. After a restart every checkpoint object loads (the step-10 one is there),
    and the same command resumes from step 10 and finishes."""
    import torch

    from sagan.checkpoint import save_checkpoint
    from sagan.config import load_config
    from sagan.training import GANTrainer

    probe = GANTrainer(load_config("configs/quickstart.yaml", TINY))
    probe.train_step(iter([(torch.rand(8, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (8,)))]))
    size = save_checkpoint(tmp_path / "probe.pt", probe).stat().st_size
    proxy.stall_upload_after(size + size // 2)
    prefix = "killed-ckpt"
    args = ["--config", "configs/quickstart.yaml", *TINY, f"data.path={persist.shards}",
            f"data.endpoint_url={persist.cfg.s3_endpoint}",  # data reads bypass the proxy
            "train.steps=20", "train.log_every=5", "train.ckpt_every=10",
            "train.max_failures=0", f"train.storage_path=s3://{persist.cfg.bucket}/{prefix}",
            "train.run_name=killed-ckpt", "tracking.registered_model=killed-ckpt-gen"]
    driver = start_driver(persist.info, args, {"AWS_ENDPOINT_URL_S3": proxy.endpoint_url})
    assert proxy.stalled.wait(300), driver.text[-3000:]
    persist.kill_s3()
    proxy.release()
    try:
        rc_a = driver.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:  # stuck on the dead storage: end it like a crash
        driver.proc.kill()
        rc_a = driver.proc.wait()
    persist.restart_dead_services()

    ckpts = {k: o for k, o in _objects(persist, f"{prefix}/").items()
             if k.endswith("/checkpoint.pt")}
    steps = {}
    client = s3_client(persist.cfg)
    for key in ckpts:  # whatever is visible is complete
        client.download_file(persist.cfg.bucket, key, str(tmp_path / "c.pt"))
        steps[key] = int(load_checkpoint(tmp_path / "c.pt")["step"])
    assert 10 in steps.values() and 20 not in steps.values(), (steps, driver.text[-3000:])

    rc_b, out_b = run_driver(persist.info, args)
    assert rc_b == 0, out_b[-4000:]
    assert "done: step 20/20" in out_b
    assert re.search(r"\[rank 0\] resumed from \S+ at step 10", out_b), out_b[-4000:]
    print(f"\nS3 killed mid-checkpoint: first run exit {rc_a}, complete checkpoints "
          f"{sorted(steps.values())}; re-run resumed at step 10 and finished 20/20")


# --------------------------------------------------------------------------- no orphans


def _child_running(parent: int, word: str, timeout: float) -> tuple[int, int]:
    """(pid, start ticks) of `parent`'s child whose command line contains `word`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and word.encode() in cmdline:
                st = proc_stat(int(entry))
                if st is not None:
                    return int(entry), st[2]
        time.sleep(0.2)
    pytest.fail(f"no child '{word}' of {parent} within {timeout} s")


def _gone(pid: int, ticks: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = proc_stat(pid)
        if st is None or st[2] != ticks or st[0] == "Z":
            return True
        time.sleep(0.1)
    return False


def _sigterm(cmd: list[str], word: str) -> tuple[int, str, int, int]:
    """Start `cmd`, wait for its child server `word`, SIGTERM `cmd` (as `timeout` does);
    return (exit code, output, server pid, its start ticks)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        pid, ticks = _child_running(proc.pid, word, timeout=240)
        time.sleep(1.0)  # well inside the command's work, not at its start
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, pid, ticks


@pytest.mark.slow
def test_sigterm_to_the_benchmark_leaves_no_s3_server(tmp_path: Path):
    rc, out, pid, ticks = _sigterm(
        [PY, "-m", "bench.data_stream", "--limit", "3000", "--repeats", "1",
         "--out", str(tmp_path / "ds.json")], "weed")
    assert rc == 143, out[-3000:]
    assert _gone(pid, ticks), f"S3 server {pid} outlived the benchmark"


@pytest.mark.slow
def test_sigterm_to_pytest_leaves_no_s3_server(tmp_path: Path):
    (tmp_path / "test_hold.py").write_text(
        "import time\n\ndef test_hold(s3_server):\n    time.sleep(600)\n")
    rc, out, pid, ticks = _sigterm(
        [PY, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_hold.py")], "weed")
    assert rc == 2 and "KeyboardInterrupt" in out, out[-3000:]  # interrupted, torn down
    assert _gone(pid, ticks), f"S3 server {pid} outlived pytest"


@pytest.mark.slow
def test_sigterm_to_up_while_starting_stops_what_it_started(tmp_path: Path):
    """`up` killed while MLflow and Ray start (S3 already serving): everything it started is
    stopped, nothing is left recorded."""
    state = tmp_path / "state"
    up_cmd = [str(ROOT / "infra" / "local" / "up"), "--free-ports", "--state-dir", str(state)]
    proc = subprocess.Popen(up_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "SAGAN_PYTHON": PY})
    try:
        deadline = time.monotonic() + 240
        while not {"s3", "mlflow", "ray"} <= set(read_pid_records(state)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        recs = read_pid_records(state)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 143, out[-3000:]
        assert {s: r.members() for s, r in recs.items()} == {s: [] for s in recs}
        assert read_pid_records(state) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
        down(state, purge=True, quiet=True)


def test_moto_era_state_dir_gets_one_line(tmp_path: Path):
    """A state dir written by the old stack (S3 in memory: its objects are gone while its
    MLflow database points at them) is refused with one line saying what to do."""
    state = tmp_path / "old"
    (state / "mlflow").mkdir(parents=True)
    (state / "mlflow" / "mlflow.db").write_bytes(b"")
    old = {"state_dir": str(state), "s3_port": 9000, "mlflow_port": 5000, "ray_gcs_port": 6379,
           "ray_dashboard_port": 8265, "ray_aux_ports": {}, "ray_worker_ports": None,
           "ray_num_cpus": None, "ray_object_store_mb": 1024, "ray_temp_dir": None,
           "bucket": "sagan"}
    (state / "stack.json").write_text(json.dumps(old))
    env = {**os.environ, "SAGAN_PYTHON": PY}
    res = subprocess.run([str(ROOT / "infra" / "local" / "up"), "--state-dir", str(state)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert "moto" in line and f"down --purge --state-dir {state}" in line
    assert read_pid_records(state) == {}  # nothing was started
    res = subprocess.run([str(ROOT / "infra" / "local" / "down"), "--purge", "--state-dir",
                          str(state)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and not state.exists()
