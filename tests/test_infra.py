"""Infrastructure: the local stack's lifecycle (up -> healthy -> up again -> down -> nothing of ours
left), its env file, jobs on it reaching MLflow and S3, the quickstart, and the cluster
definitions (Ray cluster launcher schema, KubeRay RayJob GPU arithmetic, Dockerfile)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.local.config import StackConfig, port_is_free
from infra.local.processes import PidRecord, group_members, proc_stat, read_pid_records
from infra.local.s3 import load_credentials
from infra.local.services import ray_auth_headers, s3_client, s3_credentials_path
from infra.local.stack import down, read_env_file

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
UP = ROOT / "infra" / "local" / "up"
DOWN = ROOT / "infra" / "local" / "down"
STACK = ["-m", "infra.local"]  # the CLI, run from the repo root


def _clean_env() -> dict[str, str]:
    """The test's environment without anything that could point the CLI at another stack."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAGAN_", "RAY_ADDRESS", "RAY_API_SERVER", "MLFLOW_TRACKING"))}
    env["SAGAN_PYTHON"] = PY  # the wrappers default to <repo>/.venv; use this interpreter
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", _clean_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)


def _alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def _s3_bucket_names(cfg: StackConfig) -> list[str]:
    return [b["Name"] for b in s3_client(cfg).list_buckets()["Buckets"]]


def _get(url: str) -> bytes:
    # Ray enables token auth when ~/.ray/auth_token exists; send it as `ray job` would.
    req = urllib.request.Request(url, headers=ray_auth_headers())
    return urllib.request.urlopen(req, timeout=5).read()


def _assert_all_healthy(cfg: StackConfig) -> None:
    """Independent checks (not the stack's own): Ray job API, MLflow /health, S3 ListBuckets."""
    import ray

    assert json.loads(_get(cfg.ray_address + "/api/version"))["ray_version"] == ray.__version__
    assert isinstance(json.loads(_get(cfg.ray_address + "/api/jobs/")), list)
    assert _get(cfg.mlflow_uri + "/health").strip() == b"OK"
    assert cfg.bucket in _s3_bucket_names(cfg)


@pytest.fixture
def decoy() -> subprocess.Popen:
    """A process that looks like ours by name (argv mentions ray, mlflow and moto) but is not:
    `down` must leave it alone, because it stops recorded process groups, never by name."""
    proc = subprocess.Popen(
        ["bash", "-c", 'exec -a "ray start --head mlflow server moto_server" sleep 600'],
        start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------
# the local stack
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_up_healthy_up_again_down_leaves_nothing(tmp_path: Path, decoy: subprocess.Popen,
                                                 request: pytest.FixtureRequest) -> None:
    """The README's `infra/local/up && source .state/env` and `infra/local/down` (with a
    private state dir and free ports): two racing `up`s start one healthy stack, the env file
    sources and points at it, `up` again is a no-op, and `down` stops exactly what `up`
    started."""
    state = tmp_path / "state"
    cfg = StackConfig.with_free_ports(state)
    request.addfinalizer(lambda: shutil.rmtree(str(cfg.ray_temp_dir), ignore_errors=True))
    ports = ["--s3-port", str(cfg.s3_port), "--mlflow-port", str(cfg.mlflow_port),
             "--ray-port", str(cfg.ray_gcs_port), "--dashboard-port", str(cfg.ray_dashboard_port)]
    try:
        # two `up`s at once (two users of one checkout): one starts the stack, the other waits
        # for it on the state lock and then finds it healthy
        cmd = [str(UP), "--state-dir", str(state), "--free-ports", *ports]
        racers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=_clean_env()) for _ in range(2)]
        outs = [p.communicate(timeout=240)[0] for p in racers]
        assert [p.returncode for p in racers] == [0, 0], outs
        starter, waiter = sorted(outs, key=lambda o: o.count("already running"))
        for service in ("s3", "mlflow", "ray"):
            assert f"[{service:6}] healthy" in starter
        assert waiter.count("already running") == 3
        recorded = json.loads((state / "stack.json").read_text())
        cfg = StackConfig.from_json(recorded)
        # every Ray port was chosen free, none of Ray's machine-wide defaults
        assert set(recorded["ray_aux_ports"]) >= {"ray-client-server-port",
                                                  "dashboard-agent-listen-port"}
        assert cfg.ray_temp_dir.startswith("/tmp/ray_sagan_")
        _assert_all_healthy(cfg)

        recs = read_pid_records(state)
        assert set(recs) == {"s3", "mlflow", "ray"}
        assert all(r.leader_alive() for r in recs.values())
        groups = {s: set(group_members(r.pid)) for s, r in recs.items()}
        assert len(groups["ray"]) > 5  # gcs_server, raylet, dashboard, agents ... in one group

        # env file: sourceable by bash, pointing at this stack
        shown = _run(["bash", "-c", f"set -eu; source {cfg.env_file}; env"]).stdout
        env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        assert env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{cfg.ray_dashboard_port}"
        assert env["RAY_ADDRESS"].endswith(f":{cfg.ray_gcs_port}")
        assert env["RAY_AUTH_MODE"] == "token"  # else `ray job submit` sends no token: 401
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{cfg.mlflow_port}"
        assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{cfg.s3_port}"
        # S3 keys: generated for this state dir (no fixed strings), owner-only, never printed
        keys = load_credentials(s3_credentials_path(state))
        assert env["AWS_ACCESS_KEY_ID"] == keys.key_id != "testing"
        assert env["AWS_SECRET_ACCESS_KEY"] == keys.secret and len(keys.secret) >= 32
        for private in (cfg.env_file, s3_credentials_path(state)):
            assert private.stat().st_mode & 0o077 == 0, private
        logs = "".join(p.read_text() for p in (state / "logs").iterdir())
        assert not any(v in text for text in [*outs, logs] for v in (keys.key_id, keys.secret))
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        assert env["SAGAN_DATA_BUCKET"] == cfg.bucket
        assert read_env_file(cfg.env_file)["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]

        # services listen on loopback only (Ray's internal gRPC servers cannot: see INFRA.md)
        listening = _run(["ss", "-ltnH"]).stdout if shutil.which("ss") else ""
        for port in (cfg.s3_port, cfg.mlflow_port, cfg.ray_dashboard_port):
            assert not port_is_free(port)
            addrs = [ln.split()[3] for ln in listening.splitlines()
                     if ln.split()[3].endswith(f":{port}")]
            assert all(a.startswith("127.0.0.1:") for a in addrs), addrs

        # up again: harmless, quick, same processes, still healthy
        t0 = time.monotonic()
        again = _run([str(UP), "--state-dir", str(state)])
        assert again.returncode == 0, again.stdout + again.stderr
        assert time.monotonic() - t0 < 15
        assert again.stdout.count("already running") == 3
        assert {s: r.pid for s, r in read_pid_records(state).items()} == \
            {s: r.pid for s, r in recs.items()}
        _assert_all_healthy(cfg)
        st = _run([PY, *STACK, "status", "--state-dir", str(state), "--json"], cwd=ROOT)
        assert st.returncode == 0 and all(v["healthy"] for v in json.loads(st.stdout).values())

        # a conflicting port request against the running stack is refused, not half-applied
        clash = _run([str(UP), "--state-dir", str(state), "--mlflow-port",
                      str(cfg.mlflow_port + 1)])
        assert clash.returncode == 1 and "different configuration" in clash.stderr
    finally:
        stopped = _run([str(DOWN), "--state-dir", str(state)])

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for service, rec in recs.items():
        assert not _alive(rec.pid), service
        still = [p for p in groups[service] if _alive(p)]
        assert still == [], (service, still)
        assert group_members(rec.pid) == [], service
    for port in cfg.all_ports():
        assert port_is_free(port), port
    assert not cfg.env_file.exists()
    assert read_pid_records(state) == {}
    assert decoy.poll() is None, "down killed a process that was not ours"
    assert (state / "mlflow" / "mlflow.db").exists()  # down keeps the MLflow database

    # down again: nothing to do, still fine; --purge removes state and Ray's temp dir
    again = _run([str(DOWN), "--state-dir", str(state), "--purge"])
    assert again.returncode == 0, again.stderr
    assert not state.exists() and not Path(cfg.ray_temp_dir).exists()


def test_down_never_signals_a_recycled_pid(tmp_path: Path, decoy: subprocess.Popen) -> None:
    """A pid file whose pid now belongs to another process (pid reuse after a crash or
    reboot) must not lead `down` to kill that process: the recorded start time differs."""
    st = proc_stat(decoy.pid)
    assert st is not None
    rec = PidRecord(service="ray", pid=decoy.pid, start_ticks=st[2] - 1, cmd=["ray"], log="")
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "ray.json").write_text(json.dumps(rec.__dict__))
    assert not rec.leader_alive() and not rec.group_is_ours()
    assert down(tmp_path, quiet=True) == {"ray": []}
    time.sleep(0.2)
    assert decoy.poll() is None
    assert not (tmp_path / "pids" / "ray.json").exists()


def test_cli_help_and_status_without_a_stack(tmp_path: Path) -> None:
    helped = _run([str(UP), "--help"])
    assert helped.returncode == 0 and "--free-ports" in helped.stdout
    assert _run([PY, *STACK, "--help"], cwd=ROOT).returncode == 0
    st = _run([PY, *STACK, "status", "--state-dir", str(tmp_path)], cwd=ROOT)
    assert st.returncode == 1 and st.stdout.count("down") == 3
    assert _run([str(DOWN), "--state-dir", str(tmp_path)]).returncode == 0


@pytest.mark.slow
def test_job_on_local_stack_uses_project_python_and_logs_artifacts_to_s3(
        local_stack, tmp_path: Path) -> None:
    """A job submitted like the quickstart's runs with the project interpreter, sees the stack's
    variables, and an artifact it logs through MLflow's proxy lands in the local S3 bucket."""
    job = tmp_path / "job"
    job.mkdir()
    (job / "probe.py").write_text(textwrap.dedent("""
        import os, sys, tempfile
        import mlflow
        mlflow.set_experiment("infra-probe")
        with mlflow.start_run() as run:
            path = os.path.join(tempfile.mkdtemp(), "probe.txt")
            open(path, "w").write("hello")
            mlflow.log_artifact(path)
        print("PROBE", sys.executable, os.environ["MLFLOW_TRACKING_URI"],
              os.environ["AWS_ENDPOINT_URL_S3"], run.info.run_id)
    """))
    res = _run([str(Path(PY).parent / "ray"), "job", "submit", "--address", local_stack.ray_address,
                "--working-dir", str(job), "--", "python", "probe.py"],
               env=local_stack.environ(_clean_env()))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("PROBE"))
    _, exe, mlflow_uri, s3, run_id = line.split()
    assert Path(exe).resolve().parent == Path(PY).resolve().parent
    assert mlflow_uri == local_stack.mlflow_uri and s3 == local_stack.s3_endpoint


    client = s3_client(local_stack.config)
    keys = [o["Key"] for o in client.list_objects_v2(
        Bucket=local_stack.bucket, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/probe.txt") for k in keys), keys


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "pipelines" / "prepare_data.py").exists()
                    or not (ROOT / "pipelines" / "train.py").exists(),
                    reason="needs pipelines/prepare_data.py and pipelines/train.py")
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs the dataset-fashion-mnist package")
def test_quickstart_trains_and_registers_a_model(local_stack, standard_inception_weights,
                                                tmp_path: Path) -> None:
    """The README's first command, `make quickstart` (its script, after setup), shortened by
    overrides, against the session's stack: the job completes, the model is registered under
    the quickstart config's name, FID is measured with the standard Inception features against
    the held-out test split the script wrote, and the last lines print it and the champion."""
    env = local_stack.environ(_clean_env()) | {
        "SAGAN_STATE_DIR": str(local_stack.state_dir),  # `up` finds the running stack: no-op
        "SAGAN_QUICKSTART_LIMIT": "2000",
        "SAGAN_SKIP_SETUP": "1",  # never pip-install into the shared venv from a test
    }
    res = subprocess.run(["bash", str(ROOT / "infra" / "local" / "quickstart.sh"),
                          "train.steps=10", "train.log_every=5", "train.ckpt_every=10",
                          "train.sample_every=10", "train.ema_start=0", "train.run_name=qs-test",
                          "model.g_ch=8", "model.d_ch=8", "train.batch_size=16",
                          f"train.storage_path={tmp_path / 'runs'}",
                          "tracking.registered_model=sagan-quickstart-test",
                          "eval.num_samples=100", "eval.real_samples=100", "eval.batch_size=50",
                          f"eval.cache_dir={tmp_path / 'fid'}"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "already running" in out  # reused the fixture's stack, started nothing new
    assert "models:/sagan-quickstart-test@latest" in out
    from mlflow import MlflowClient

    mv = MlflowClient(local_stack.mlflow_uri).get_model_version_by_alias(
        "sagan-quickstart-test", "latest")
    assert int(mv.version) >= 1
    fid = float(mv.tags["fid"])
    assert 100 < fid < 600  # 10 steps of a tiny model: far from real, far from zero
    assert f"FID:               {fid:.1f}   (EMA generator, 100 samples vs 100 held-out" in out
    champion = MlflowClient(local_stack.mlflow_uri).get_model_version_by_alias(
        "sagan-quickstart-test", "champion")
    assert "models:/sagan-quickstart-test@champion" in out and champion.tags["fid"]
    assert "fashion-mnist-32-test" in out  # the held-out split was prepared and used
    assert any((tmp_path / "runs").rglob("*")), "no checkpoint written to train.storage_path"


def test_quickstart_names_a_missing_config_and_starts_nothing(tmp_path: Path) -> None:
    """SAGAN_CONFIG picks another preset; a wrong path stops at once with one line naming the
    knob and the file, before any virtualenv, stack or job."""
    env = _clean_env() | {"SAGAN_CONFIG": "configs/nope.yaml", "SAGAN_SKIP_SETUP": "1",
                          "SAGAN_STATE_DIR": str(tmp_path / "state")}
    res = subprocess.run(["bash", str(ROOT / "infra" / "local" / "quickstart.sh")],
                         capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: SAGAN_CONFIG: no such file configs/nope.yaml"
    assert res.stdout == "" and not (tmp_path / "state").exists()


def test_shell_scripts_parse_and_are_executable() -> None:
    for name in ("up", "down", "quickstart.sh"):
        path = ROOT / "infra" / "local" / name
        assert _run(["bash", "-n", str(path)]).returncode == 0, name
    assert os.access(UP, os.X_OK) and os.access(DOWN, os.X_OK)


# --------------------------------------------------------------------------------------------
# cluster definitions
# --------------------------------------------------------------------------------------------
def test_ray_cluster_yaml_validates_against_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # the check `ray up` itself runs

    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # CPU head
    gpu = [t for name, t in types.items()
           if name != raw["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert raw["max_workers"] >= gpu[0]["max_workers"]
    # sagan128's 8 x 1-GPU workers fit in the worker type's capacity
    sagan128 = yaml.safe_load((ROOT / "configs" / "sagan128.yaml").read_text())["cluster"]
    assert gpu[0]["max_workers"] * gpu[0]["resources"]["GPU"] >= \
        sagan128["workers"] * sagan128["gpus_per_worker"]
    # the project is synced and installed, and jobs know MLflow and the bucket
    assert any(remote.rstrip("/").endswith("sagan") and local == "."
               for remote, local in raw["file_mounts"].items())
    assert any("pip install" in c and "sagan" in c for c in raw["setup_commands"])
    opts = " ".join(raw["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in opts and "SAGAN_DATA_BUCKET=" in opts
    assert {".venv", ".state", "data"} <= set(raw["rsync_exclude"])

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 4  # not a schema field
    with pytest.raises(Exception, match="gpus"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_has_consistent_gpu_worker_group() -> None:
    job = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith(
        "python pipelines/train.py --config configs/sagan128.yaml")
    assert (ROOT / "configs" / "sagan128.yaml").exists()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"

    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert len(gpu_groups) == 1
    g = gpu_groups[0]
    (container,) = g["template"]["spec"]["containers"]
    req, lim = container["resources"]["requests"], container["resources"]["limits"]
    gpus = int(lim["nvidia.com/gpu"])
    assert gpus >= 1 and int(req["nvidia.com/gpu"]) == gpus  # extended resources: req == lim
    assert int(g["rayStartParams"]["num-gpus"]) == gpus
    assert int(g["rayStartParams"]["num-cpus"]) <= int(lim["cpu"])
    assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_TRACKING_URI", "SAGAN_DATA_BUCKET"} <= env
    # the job's demand fits the group: sagan128 = workers x gpus_per_worker, cpus_per_worker
    t = yaml.safe_load((ROOT / "configs" / "sagan128.yaml").read_text())["cluster"]
    assert g["replicas"] * gpus >= t["workers"] * t["gpus_per_worker"]
    per_pod = gpus // t["gpus_per_worker"]
    assert per_pod * t["cpus_per_worker"] <= int(g["rayStartParams"]["num-cpus"])
    import ray

    assert cluster["rayVersion"] == ray.__version__  # cluster and submitting client agree


def test_dockerfile_builds_on_ray_gpu_image_and_installs_project() -> None:
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    import ray

    assert f"ARG RAY_VERSION={ray.__version__}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-" in text and "-gpu" in text
    assert "pip install" in text and "-e ." in text
    for path in ("sagan", "pipelines", "configs", "pyproject.toml"):
        assert f"COPY --chown=ray:users {path}" in text, path
