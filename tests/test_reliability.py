"""Issue 9: faults injected into a real training pipeline, and nothing lost.

Every test here runs `pipelines/train.py` against the shared `local_stack` (a real Ray head,
a real MLflow server with sqlite, SeaweedFS S3 on loopback) and injects the fault for real:
SIGKILL of a Ray Train worker process, a TCP proxy that drops the S3 connection in the middle of a
checkpoint upload, a learning rate that really overflows the losses, a kernel file-size limit
that makes a checkpoint write fail half-way, a pickle that tries to run code. Nothing is mocked.

The driver runs as a local process connected to the stack's Ray cluster (RAY_ADDRESS, the GCS
address), which is what `ray job submit` runs on the head; it skips the job packaging, and
the driver-loss case (`ray job stop`, then re-submitting) is covered by
tests/test_train_e2e.py::test_stopped_job_resumes_to_exact_step_count. The S3 outage during
data reads and the secrets scan run as a real `ray job submit` in test_reliability_secrets.py.
docs/RELIABILITY.md maps each fault to its test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sagan.checkpoint import CheckpointError, load_checkpoint, restore_trainer
from sagan.config import load_config
from sagan.training import GANTrainer
from tests.fixtures.s3 import TcpProxy
from tests.fixtures.stack import JOB_TINY, ROOT, Driver, run_driver, runs_named, start_driver

TINY = [*JOB_TINY, "train.sample_every=0"]
STEP_LINE = re.compile(r"\(RayTrainWorker pid=(\d+)\).*\bstep (\d+)/(\d+) ")
RESUMED = re.compile(r"\[rank (\d+)\] resumed from (\S+) at step (\d+)")
WORKER_RANKS = re.compile(r"pid=(\d+)\) world_rank=(\d+)")
ACTOR_PREFIX = re.compile(r"\((\w+) pid=\d+\)")
# Ray's placement-group cleanup thread may print a traceback of its own when a driver exits
# (ray.train internals, not the training code): tolerated, nothing else is.
RAY_SHUTDOWN_NOISE = {"PlacementGroupCleaner"}


def traceback_sources(out: str) -> set[str]:
    """Who printed a Python traceback: an actor class name, or 'driver' for unprefixed lines."""
    found = set()
    for line in out.splitlines():
        if "Traceback (most recent call last)" in line:
            m = ACTOR_PREFIX.search(line)
            found.add(m.group(1) if m else "driver")
    return found


# --------------------------------------------------------------------------- helpers


def wait_for(predicate, timeout: float, what: str, driver: Driver | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if driver is not None and driver.proc.poll() is not None:
            pytest.fail(f"driver exited ({driver.proc.returncode}) before {what}:\n"
                        + driver.text[-4000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def descends_from(pid: int, ancestor: int) -> bool:
    """True if `ancestor` is `pid`'s parent, grandparent, ... (from /proc/PID/stat)."""
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the (comm) field
        if pid == ancestor:
            return True
    return False


def registered_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train has registered (its controller writes
    checkpoint_manager_snapshot.json after registering one), or None."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("step")


def checkpoint_steps(run_dir: Path) -> dict[str, int]:
    """checkpoint dir name -> step, for every checkpoint file that loads."""
    out = {}
    for p in sorted(run_dir.glob("checkpoint_*/checkpoint.pt")):
        try:
            out[p.parent.name] = int(load_checkpoint(p)["step"])
        except CheckpointError:  # being written right now
            continue
    return out


def metric_history(stack, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.mlflow_uri).get_metric_history(run_id, key)


def all_finite(state: dict) -> bool:
    """Every float tensor (parameters and buffers) of G, D and the EMA copy is finite."""
    return all(torch.isfinite(v).all() for k in ("G", "D", "G_ema")
               for v in state[k].values() if torch.is_floating_point(v))


# --------------------------------------------------------------------------- worker loss


@pytest.mark.slow
def test_worker_sigkill_restarts_from_last_checkpoint(local_stack, stack_shards, tmp_path):
    """SIGKILL one of the two Ray Train worker processes after the first checkpoint: Ray
    restarts the worker group (FailureConfig), rank 0 resumes from the last checkpoint, the run
    ends at exactly train.steps, at most one checkpoint interval of work is redone, and MLflow
    keeps ONE run whose loss history has every step exactly once."""
    steps, every = 60, 10
    storage = tmp_path / "runs"
    driver = start_driver(local_stack, [
        "--config", "configs/quickstart.yaml", *TINY, f"data.path={stack_shards}",
        f"train.steps={steps}", "train.log_every=1", f"train.ckpt_every={every}",
        f"train.storage_path={storage}", "train.run_name=rel-worker-kill", "--no-register"])
    run_dir = storage / "rel-worker-kill"
    # Wait until Ray has *registered* a checkpoint (its snapshot lists one), not merely until a
    # file exists: only a registered checkpoint is what a restart resumes from.
    wait_for(lambda: registered_step(run_dir) is not None, 300, "a registered checkpoint",
             driver)

    # The victim: rank 1 as the driver printed it. Checked to be a RayTrainWorker descending
    # from *this* stack's `ray start`, so no other Ray process on the machine can be hit.
    ranks = {int(r): int(p) for p, r in WORKER_RANKS.findall(driver.text)}
    assert sorted(ranks) == [0, 1], driver.text[-3000:]
    victim, rank0_before = ranks[1], ranks[0]
    title = Path(f"/proc/{victim}/cmdline").read_bytes()
    assert b"RayTrainWorker" in title and descends_from(victim, local_stack.pids["ray"])
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    registered_at_kill = registered_step(run_dir)

    assert driver.wait() == 0, driver.text[-4000:]
    out = driver.text
    assert f"done: step {steps}/{steps}" in out
    assert out.count("Started training worker group") == 2  # one restart, no more

    resumed = [(int(r), p, int(s)) for r, p, s in RESUMED.findall(out)]
    assert {r for r, _, _ in resumed} == {0, 1} and len(resumed) == 2, resumed
    resumed_at = resumed[0][2]
    assert all(s == resumed_at for _, _, s in resumed)
    # What rank 0 of the first worker group had finished when its peer died:
    reached = max(int(s) for pid, s, _ in STEP_LINE.findall(out) if int(pid) == rank0_before)
    assert registered_at_kill <= resumed_at <= reached < steps, (registered_at_kill,
                                                                 resumed_at, reached)
    assert reached - resumed_at <= every  # lost at most one checkpoint interval
    # the stall: from the kill to the new group's first step (docs/RELIABILITY.md's table)
    again = next(t for t, line in zip(driver.stamps, driver.lines, strict=False)
                 if t > killed_at and (m := STEP_LINE.search(line))
                 and int(m.group(1)) not in ranks.values())
    print(f"\nworker kill: rank 0 had finished step {reached} (checkpoint registered at step "
          f"{registered_at_kill}); the new group resumed at step {resumed_at}, training again "
          f"{again - killed_at:.0f} s after the kill; {reached - resumed_at} steps redone")
    assert resumed_at % every == 0

    final = checkpoint_steps(run_dir)
    assert max(final.values()) == steps
    (run,) = runs_named(local_stack, "rel-worker-kill")  # one MLflow run
    history = [m.step for m in metric_history(local_stack, run.info.run_id, "loss_d")]
    assert history == list(range(1, steps + 1))  # continuous, no duplicates


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_keeps_last_checkpoint(local_stack, stack_shards,
                                                                     tmp_path):
    """train.lr_g=1e30 makes G's spectrally normalised weights overflow after one update, so
    D's loss is NaN at step 2 (measured; deterministic). With nan_policy=stop the job ends at
    once (no FailureConfig retries of a deterministic failure) with one line naming the step
    and the last good checkpoint, which loads and holds finite weights; MLflow marks the run
    FAILED with the reason."""
    storage = tmp_path / "runs"
    rc, out = run_driver(local_stack, [
        "--config", "configs/quickstart.yaml", *TINY, f"data.path={stack_shards}", "train.steps=6",
        "train.log_every=1", "train.ckpt_every=1", "train.lr_g=1e30",
        f"train.storage_path={storage}", "train.run_name=rel-nan-stop"])
    assert rc == 3, out[-4000:]
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"error: non-finite loss_d at step 2: stopping \(train\.nan_policy=stop\)"
                     r".*; last good checkpoint: (\S+) \(step 1\)", last)
    assert m, last
    assert out.count("Started training worker group") == 1  # not retried
    assert traceback_sources(out) <= RAY_SHUTDOWN_NOISE, out[-6000:]

    ckpts = checkpoint_steps(storage / "rel-nan-stop")
    assert list(ckpts.values()) == [1]  # nothing was written past the bad step
    state = load_checkpoint(Path(m.group(1)) / "checkpoint.pt")
    assert state["step"] == 1 and all_finite(state)
    restore_trainer(GANTrainer(load_config("configs/quickstart.yaml", TINY)), state)

    (run,) = runs_named(local_stack, "rel-nan-stop")
    assert run.info.status == "FAILED"
    assert "non-finite loss_d at step 2" in run.data.tags["sagan.stopped"]


@pytest.mark.slow
def test_nonfinite_loss_skip_policy_counts_and_finishes(local_stack, stack_shards, tmp_path):
    """The same divergence with train.nan_policy=skip: every update whose loss is not finite is
    dropped and counted (skipped_steps counts skipped optimizer updates, D and G separately),
    the run reaches train.steps, MLflow has the count at every logged step, and no NaN reaches
    a parameter, the optimizer state or a BatchNorm running statistic (the forward pass updates
    those itself; a skipped step restores them)."""
    storage = tmp_path / "runs"
    rc, out = run_driver(local_stack, [
        "--config", "configs/quickstart.yaml", *TINY, f"data.path={stack_shards}", "train.steps=6",
        "train.log_every=1", "train.ckpt_every=3", "train.lr_g=1e30", "train.nan_policy=skip",
        f"train.storage_path={storage}", "train.run_name=rel-nan-skip", "--no-register"])
    assert rc == 0, out[-4000:]
    assert "done: step 6/6" in out
    (run,) = runs_named(local_stack, "rel-nan-skip")
    skipped = [(m.step, m.value) for m in metric_history(local_stack, run.info.run_id,
                                                         "skipped_steps")]
    # step 1 is clean; from step 2 on both the D and the G update are dropped
    assert skipped == [(s, 2.0 * (s - 1)) for s in range(1, 7)], skipped
    state = load_checkpoint(max((storage / "rel-nan-skip").glob("checkpoint_*/checkpoint.pt"),
                                key=lambda p: load_checkpoint(p)["step"]))
    assert state["step"] == 6 and state["skipped_steps"] == 10
    assert all_finite(state)  # BN running stats included, in G and in the EMA copy
    moments = [v for opt in ("opt_g", "opt_d") for s in state[opt]["state"].values()
               for v in s.values() if torch.is_tensor(v) and torch.is_floating_point(v)]
    assert moments and all(torch.isfinite(v).all() for v in moments)


# --------------------------------------------------------------------------- storage


class UploadFaultProxy(TcpProxy):
    """Loopback TCP proxy (127.0.0.1:<free port> -> S3) that breaks one upload in the middle.

    `fail_upload_after(nbytes, refuse_next, only)`: once `nbytes` more have gone client ->
    server, every open connection is reset (the chunk that crossed the mark is dropped, so that
    object can never be complete), and the next `refuse_next` new connections whose first
    request line contains `only` are reset as soon as that line arrives; everything else is
    forwarded. Counting the retries of that one request, rather than cutting for some seconds,
    makes the fault independent of machine load: pyarrow's S3 client (Ray Train's uploader)
    makes 3 attempts per request, so refuse_next=2 fails exactly the interrupted upload, while
    Ray's bookkeeping writes (which may overlap it on a busy machine) go through.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        # set before the base class starts the accept thread
        self._upload_armed: tuple[int, int, bytes] | None = None
        self._refuse = 0
        self._only = b""
        self.bytes_up = 0
        self.fired_at: int | None = None  # bytes_up when the fault fired
        self.refused = 0
        super().__init__(target_host, target_port)

    def fail_upload_after(self, nbytes: int, refuse_next: int = 2,
                          only: bytes = b"/checkpoint.pt") -> None:
        with self._lock:
            self._upload_armed = (self.bytes_up + nbytes, refuse_next, only)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            first = b""
            if self._refuse > 0:  # peek at the request line: is it a retry of that upload?
                client.settimeout(5)
                try:
                    first = client.recv(65536)
                except OSError:
                    pass
                client.settimeout(None)
                with self._lock:
                    refuse = self._refuse > 0 and self._only in first.split(b"\r\n", 1)[0]
                    if refuse:
                        self._refuse -= 1
                        self.refused += 1
                if refuse:
                    self._reset(client)
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                upstream.sendall(first)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self.bytes_up += len(first)
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(65536):
                if upload:
                    with self._lock:
                        self.bytes_up += len(data)
                        fire = (self._upload_armed is not None
                                and self.bytes_up >= self._upload_armed[0])
                        if fire:
                            self.fired_at = self.bytes_up
                            _, self._refuse, self._only = self._upload_armed
                            self._upload_armed = None
                            conns, self._conns = self._conns, set()
                    if fire:
                        for s in conns:
                            self._reset(s)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(src, dst)


@pytest.fixture
def upload_proxy(local_stack) -> Iterator[UploadFaultProxy]:
    host, port = local_stack.s3_endpoint.split("://", 1)[1].rsplit(":", 1)
    proxy = UploadFaultProxy(host, int(port))
    yield proxy
    proxy.close()


def _s3(stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.slow
def test_checkpoint_upload_cut_midway_keeps_previous_checkpoint(local_stack, stack_shards, tmp_path,
                                                                upload_proxy):
    """Checkpoints go to s3:// through a proxy that resets the connection half-way through the
    second checkpoint file's upload and refuses its retries. S3 never holds a partial object; the
    run never resumes from a broken checkpoint: pyarrow (Ray Train's uploader) loses that
    failed part upload without raising, so Ray even registers the step-20 checkpoint whose file
    never arrived; the driver says so in one line (exit 3) instead of crashing on it, and
    re-running the same command falls back to the intact step-10 checkpoint and finishes."""
    # Size of one checkpoint of this model after a step (Adam's moments exist then): the fault
    # fires half-way through the second upload (the first one, plus Ray's small marker and
    # snapshot files, come before it).
    from sagan.checkpoint import save_checkpoint

    probe = GANTrainer(load_config("configs/quickstart.yaml", TINY))
    probe.train_step(iter([(torch.rand(8, 1, 32, 32) * 2 - 1, torch.randint(0, 10, (8,)))]))
    size = save_checkpoint(tmp_path / "probe.pt", probe).stat().st_size
    upload_proxy.fail_upload_after(size + size // 2, refuse_next=2)

    prefix = "reliability-ckpt"
    args = ["--config", "configs/quickstart.yaml", *TINY, f"data.path={stack_shards}",
            f"data.endpoint_url={local_stack.s3_endpoint}",  # data reads bypass the proxy
            "train.steps=20", "train.log_every=5", "train.ckpt_every=10",
            f"train.storage_path=s3://{local_stack.bucket}/{prefix}",
            "train.run_name=rel-upload-cut", "train.keep_checkpoints=5",
            "tracking.registered_model=rel-upload-cut-gen"]
    env = {"AWS_ENDPOINT_URL_S3": upload_proxy.endpoint_url}  # checkpoint storage only
    rc_a, out_a = run_driver(local_stack, args, env)
    print(f"\nupload fault after {upload_proxy.fired_at} bytes, {upload_proxy.refused} retries "
          f"refused; first run exit code {rc_a}")
    assert upload_proxy.fired_at is not None and upload_proxy.refused == 2

    s3 = _s3(local_stack)
    listed = s3.list_objects_v2(Bucket=local_stack.bucket, Prefix=f"{prefix}/rel-upload-cut/")
    keys = [o["Key"].split("/") for o in listed.get("Contents", [])]
    ckpt_dirs = sorted({k[2] for k in keys if len(k) > 3 and k[2].startswith("checkpoint_")})
    files = {o["Key"].split("/")[2]: o["Key"] for o in listed.get("Contents", [])
             if o["Key"].endswith("/checkpoint.pt")}
    steps = {}
    for name, key in files.items():  # every object that exists is complete and loads
        local = tmp_path / f"{name}.pt"
        s3.download_file(local_stack.bucket, key, str(local))
        steps[name] = int(load_checkpoint(local)["step"])
    where = (f"objects: {[(o['Key'], o['Size']) for o in listed.get('Contents', [])]}, "
             f"fault at {upload_proxy.fired_at} of {upload_proxy.bytes_up} bytes up; "
             f"driver: {out_a[-3000:]}")
    assert ckpt_dirs and steps.get(ckpt_dirs[0]) == 10, where  # the previous one is intact

    if rc_a == 3:  # pyarrow swallowed the failed upload; Ray registered the empty checkpoint
        assert len(ckpt_dirs) == 2 and ckpt_dirs[1] not in files
        last = out_a.strip().splitlines()[-1]
        assert last.startswith("error: the final checkpoint") and "re-run the same command" \
            in last, last
    else:  # an uploader that reports the failure: Ray restarts the group from step 10
        assert rc_a == 0, out_a[-4000:]
        assert re.search(r"resumed from \S+ at step 10", out_a)

    rc_b, out_b = run_driver(local_stack, args)  # the same command, storage healthy again
    assert rc_b == 0, out_b[-4000:]
    assert "done: step 20/20" in out_b
    if rc_a == 3:
        assert "is unusable" in out_b and "falling back to" in out_b
        assert re.search(r"\[rank 0\] resumed from \S+ at step 10", out_b)
    (run,) = runs_named(local_stack, "rel-upload-cut")
    assert run.info.status == "FINISHED"
    history = [m.step for m in metric_history(local_stack, run.info.run_id, "loss_d")]
    assert history == [5, 10, 15, 20]


def test_checkpoint_write_failing_midway_keeps_previous_file(tmp_path):
    """A disk that fills up while a checkpoint is written (RLIMIT_FSIZE: the kernel fails the
    write with EFBIG half-way through, in a child process): save_checkpoint raises one
    CheckpointError line naming the OS error (torch alone says 'unexpected pos N vs M'), the
    previous checkpoint under the same name is untouched and loads, no temp file is left."""
    code = """
import resource, sys
from sagan.checkpoint import CheckpointError, save_checkpoint
from sagan.config import load_config
from sagan.training import GANTrainer
cfg = load_config("configs/quickstart.yaml", sys.argv[2:])
trainer = GANTrainer(cfg)
path = save_checkpoint(sys.argv[1], trainer)
size = path.stat().st_size
trainer.step = 99
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
try:
    save_checkpoint(sys.argv[1], trainer)
except CheckpointError as exc:
    print(exc)
else:
    raise SystemExit("the write did not fail")
"""
    path = tmp_path / "checkpoint.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(path), *TINY], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (f"checkpoint '{path}': write failed (File too large, errno "
                                   "27); any previous checkpoint at that path is unchanged")
    assert load_checkpoint(path)["step"] == 0  # the previous content, complete
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


# --------------------------------------------------------------------------- tampering


class _RunsCode:
    """A pickle payload: unpickling it calls os.system (what weights_only must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    """A checkpoint whose pickle would run a shell command when loaded without weights_only:
    load_checkpoint refuses it with one CheckpointError line and the command never runs."""
    marker = tmp_path / "pwned"
    state = {"format": 1, "step": 0, "G": {}, "D": {}, "G_ema": {}, "opt_g": {}, "opt_d": {},
             "rng": {}, "config": {}, "payload": _RunsCode(marker)}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt': unreadable") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_checkpoint_with_foreign_keys_gives_clear_error(tmp_path):
    """A checkpoint of another model (renamed and extra tensors, other widths): restoring names
    what does not match instead of a torch traceback."""
    from sagan.checkpoint import save_checkpoint

    trainer = GANTrainer(load_config("configs/quickstart.yaml", TINY))
    state = torch.load(save_checkpoint(tmp_path / "c.pt", trainer), weights_only=True)
    g = state["G"]
    key = next(k for k in g if "weight" in k)
    g["renamed." + key] = g.pop(key)
    g["extra.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"'G' weights do not match this model "
                                              r"\(missing: .*unexpected: .*extra\.bias"):
        restore_trainer(trainer, load_checkpoint(tmp_path / "foreign.pt"))
    wider = GANTrainer(load_config("configs/quickstart.yaml", [*TINY, "model.g_ch=16"]))
    with pytest.raises(CheckpointError, match=r"'G' weights do not match.*wrong shape"):
        restore_trainer(wider, load_checkpoint(tmp_path / "c.pt"))
