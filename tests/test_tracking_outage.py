"""Issue 27: training never waits on the tracking server.

The shared `local_stack`'s MLflow server (real, sqlite) is SIGKILLed while a real 2-worker job
trains, kept down, and started again with the same code as `infra/local/up` (same port, same
database). MLflow's HTTP retry budget is shortened in the job (2 retries, backoff factor 1:
a few seconds instead of ~4 minutes), so the outage outlasts it many times over: before the
tracking queue, the first log call after the kill raised out of the training loop.

Asserted: steps made during the outage are within noise of the rate before it; every logged
step is in MLflow exactly once afterwards; every image step is there unless counted in
`dropped_images` (the image queue is shrunk to 4 so the drop path runs); the run ends
FINISHED with a registered model; the outage and the recovery are each one line.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from infra.local.processes import read_pid_records
from infra.local.stack import up
from tests.fixtures.stack import JOB_TINY, Driver, runs_named, start_driver

BEFORE_S = 15.0
STEP = re.compile(r"\bstep (\d+)/(\d+) ")
SHORT_RETRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
OUTAGE_S = float(os.environ.get("SAGAN_TEST_MLFLOW_OUTAGE_S", "35"))


def step_times(driver: Driver) -> list[tuple[float, int]]:
    """(arrival time, step) of every progress line rank 0 printed so far."""
    out = []
    for stamp, line in zip(list(driver.stamps), list(driver.lines), strict=False):
        m = STEP.search(line)
        if m:
            out.append((stamp, int(m.group(1))))
    return out


def steps_between(points: list[tuple[float, int]], t0: float, t1: float) -> int:
    inside = [s for t, s in points if t0 <= t <= t1]
    return max(inside) - min(inside) if len(inside) > 1 else 0


def kill_mlflow(stack) -> None:
    rec = read_pid_records(stack.state_dir)["mlflow"]
    os.killpg(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while rec.members() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not rec.members(), "MLflow server survived SIGKILL"


def wait_step(driver: Driver, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for _, s in step_times(driver)):
        if driver.proc.poll() is not None:
            pytest.fail(f"driver exited ({driver.proc.returncode}):\n{driver.text[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step {step} within {timeout} s:\n{driver.text[-3000:]}")
        time.sleep(0.2)


def image_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """key -> steps of the full-size image files MLflow's image charts read (images/...)."""
    out: dict[str, list[int]] = {}
    for f in client.list_artifacts(run_id, "images"):
        name = f.path.rsplit("/", 1)[-1]
        if not name.endswith(".png"):
            continue
        key, _, step, *_ = name[:-4].split("+")
        out.setdefault(key.replace("~", "/"), []).append(int(step))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.slow
def test_mlflow_sigkilled_training_goes_on_and_nothing_is_lost(local_stack, stack_shards,
                                                               tmp_path):
    steps, sample_every, name = 160, 10, "outage-mlflow"
    driver = start_driver(local_stack, [
        "--config", "configs/quickstart.yaml", *JOB_TINY, f"data.path={stack_shards}",
        f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=100",
        f"train.sample_every={sample_every}", "tracking.max_queued_images=4",
        "tracking.system_metrics_every=0", f"train.storage_path={tmp_path / 'runs'}",
        f"train.run_name={name}"], env=SHORT_RETRY)
    try:
        wait_step(driver, 20, 300)
        time.sleep(BEFORE_S)  # the rate before the outage
        t_kill = time.monotonic()
        kill_mlflow(local_stack)
        time.sleep(OUTAGE_S)
        t_back = time.monotonic()
        up(local_stack.config, quiet=True)  # the dead service only; same port and database
        rc = driver.wait(600)
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        up(local_stack.config, quiet=True)  # never leave the shared stack without MLflow
    time.sleep(0.3)
    out = driver.text
    assert rc == 0, out[-5000:]

    points = step_times(driver)
    before = steps_between(points, t_kill - BEFORE_S, t_kill) / BEFORE_S
    during = steps_between(points, t_kill, t_back)
    print(f"\nsteps/s before the outage {before:.2f}; steps during the {OUTAGE_S:.0f} s outage "
          f"{during} ({during / OUTAGE_S:.2f}/s)")
    assert before > 0
    assert during / OUTAGE_S >= 0.5 * before, "training slowed down while MLflow was down"
    assert len(re.findall(r"\[mlflow\] \S+ unreachable", out)) == 1, out[-3000:]
    assert re.search(r"\[mlflow\] \S+ is back after \d+ s", out), out[-3000:]

    (run,) = runs_named(local_stack, name)
    assert run.info.status == "FINISHED"
    client = MlflowClient(local_stack.mlflow_uri)
    history = client.get_metric_history(run.info.run_id, "loss_d")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    dropped = client.get_metric_history(run.info.run_id, "dropped_images")
    n_dropped = int(max(m.value for m in dropped))
    images = image_steps(client, run.info.run_id)
    assert set(images) == {"samples", "attention/16"}, images
    expected = list(range(sample_every, steps + 1, sample_every))
    for key, logged in images.items():
        assert len(logged) == len(set(logged)), f"{key}: a step logged twice"
        assert set(logged) <= set(expected)
    missing = sum(len(expected) - len(v) for v in images.values())
    print(f"images: {sum(map(len, images.values()))} logged, {missing} missing, "
          f"{n_dropped} counted as dropped")
    assert missing == n_dropped and n_dropped > 0
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1 and versions[0].tags.get("step") == str(steps)


# --------------------------------------------------------------------------- no server at all


def test_queue_never_blocks_and_spills_what_it_cannot_send(tmp_path, monkeypatch):
    """A tracking URI where nothing listens: logging returns at once, scalars past the memory
    bound go to the spill file, `close` gives up after its wait with one line naming the
    command, and that command (a real sqlite-backed MLflow store) gets every point once."""
    import socket

    from pipelines import tracking_queue
    from pipelines.tracking_queue import TrackingQueue, main

    with socket.socket() as s:  # a free loopback port: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines: list[str] = []
    monkeypatch.setattr(tracking_queue, "SPILL_AFTER", 50)
    q = TrackingQueue(f"http://127.0.0.1:{port}", "run123", tmp_path / "spill",
                      max_images=2, say=lines.append)
    t0 = time.perf_counter()
    for step in range(1, 101):
        q.log_metrics({"loss_d": float(step), "loss_g": -float(step)}, step)
        if step % 10 == 0:
            q.log_image(object(), "samples", step)
    spent = time.perf_counter() - t0
    assert spent < 1.0, f"100 log calls took {spent:.2f} s with the server down"
    assert q.close(wait_s=3) is False
    assert q.dropped_images == 10  # 8 beyond the bound of 2, then the 2 left at close
    assert any("unreachable" in line for line in lines), lines
    (last,) = [line for line in lines if line.startswith("error:")]
    assert "python -m pipelines.tracking_queue" in last and "\n" not in last
    spilled = q.spill_path.read_text().splitlines()
    assert len(spilled) == 100 * 3  # loss_d, loss_g, dropped_images at every step

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("spill", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    for _ in range(2):  # sending twice adds nothing
        assert main([str(q.spill_path), "--tracking-uri", uri, "--run-id", run_id]) == 0
    history = client.get_metric_history(run_id, "loss_d")
    assert sorted(m.step for m in history) == list(range(1, 101))


def test_outage_fields_bad_values_one_line_naming_the_field():
    from pipelines.config import load_run_config
    from sagan.config import ConfigError

    for override, field in (("tracking.wait_s=-1", "tracking.wait_s"),
                            ("tracking.max_queued_images=-2", "tracking.max_queued_images"),
                            ("cluster.storage_wait_s=-1", "cluster.storage_wait_s"),
                            ("data.max_outage_s=0", "data.max_outage_s")):
        with pytest.raises(ConfigError) as err:
            load_run_config(None, [override])
        assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_mlflow_down_at_the_end_run_ends_with_checkpoint_and_commands(local_stack, stack_shards,
                                                                      tmp_path):
    """MLflow SIGKILLed mid-run and still down when training ends: rank 0 waits
    tracking.wait_s with a "waiting for MLflow at URL (down since ...)" line, keeps its unsent
    metrics in a spill file; the driver waits as long, then ends (exit 3) with the checkpoint
    saved and one line naming the command that registers it. With the server back, the two
    printed commands give a FINISHED run, a registered model and every step exactly once."""
    import shlex
    import subprocess
    import sys

    from tests.fixtures.stack import ROOT

    steps, name = 24, "outage-mlflow-end"
    driver = start_driver(local_stack, [
        "--config", "configs/quickstart.yaml", *JOB_TINY, f"data.path={stack_shards}",
        f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=12",
        "train.sample_every=0", "tracking.system_metrics_every=0", "tracking.wait_s=8",
        f"tracking.spill_dir={tmp_path / 'spill'}", f"train.storage_path={tmp_path / 'runs'}",
        f"train.run_name={name}"], env=SHORT_RETRY)
    try:
        wait_step(driver, 8, 300)
        kill_mlflow(local_stack)
        rc = driver.wait(300)
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        up(local_stack.config, quiet=True)
    time.sleep(0.3)
    out = driver.text
    assert rc == 3, out[-5000:]
    assert re.search(r"waiting for MLflow at \S+ \(down since \d\d:\d\d:\d\d UTC\) to send",
                     out), out[-3000:]
    assert re.search(r"waiting for MLflow at \S+ \(down since .*\) to register the model", out)
    replay = re.search(r"send them later with: (python -m pipelines\.tracking_queue .*)$", out,
                       re.M)
    register = re.search(r"^error: MLflow at .* unreachable .*register it later with: "
                         r"(python pipelines/register\.py .*)$", out, re.M)
    assert replay and register, out[-3000:]
    assert any(f"step {steps}/{steps}" in line for line in driver.lines)

    for command in (replay.group(1), register.group(1)):
        proc = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT,
                              env=local_stack.environ(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    (run,) = runs_named(local_stack, name)
    assert run.info.status == "FINISHED"
    client = MlflowClient(local_stack.mlflow_uri)
    history = client.get_metric_history(run.info.run_id, "loss_d")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1 and versions[0].tags.get("step") == str(steps)


def test_later_commands_bad_input_one_line(tmp_path, capsys):
    """The two commands a run prints when MLflow stayed down: a wrong path is one line, exit 2."""
    from pipelines import register, tracking_queue

    assert register.main([str(tmp_path / "nope")]) == 2
    assert tracking_queue.main([str(tmp_path / "nope.jsonl"), "--tracking-uri",
                                "http://127.0.0.1:1", "--run-id", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
    assert "nope/checkpoint.pt" in err[0] and "spill_file" in err[1]
