"""One-command local stack: S3 (moto), MLflow tracking server and a Ray head, all on 127.0.0.1.

    infra/local/up                      # start (or confirm) the stack, write .state/env
    source .state/env                   # RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_* ...
    python infra/local/stack.py status  # health of each service
    infra/local/down                    # stop exactly what `up` started

Why a supervisor of our own instead of `docker compose`: the target machines have no container
engine, everything here is a pip dependency of the project, and a laptop user gets the same
three endpoints a cluster has (Ray job server, MLflow with S3-proxied artifacts, S3).

Process ownership. Every service is started as the leader of a new session/process group and
its pid (plus the kernel's start time of that pid, so a recycled pid is never mistaken for ours)
is written to `<state>/pids/<service>.json`. `down` signals those process groups and nothing
else: never `ray stop` (which kills every Ray process on the machine by name) and never `pkill`.
Ray runs as `ray start --head --block`, so its whole process tree (GCS, raylet, dashboard,
agents and every worker the raylet forks) stays inside the group of the `ray start` process we
launched, with a private `--temp-dir` and explicit ports so it cannot touch another cluster.

Library use (tests/fixtures/stack.py builds on this):

    from infra.local.stack import StackConfig, up, down, status
    cfg = StackConfig.with_free_ports(state_dir)     # isolated ports for tests
    info = up(cfg)                                   # -> StackInfo (addresses, env file)
    down(cfg.state_dir, purge=True)

Limitation, by design: moto keeps S3 in memory, so `down` discards the shards and the MLflow
artifacts stored there, while the MLflow database (sqlite in the state dir) survives. Re-run
the quickstart (or `down --purge` for a clean slate) after a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `python infra/local/stack.py` must find infra.local.s3
    sys.path.insert(0, str(REPO_ROOT))

from infra.local.s3 import start_s3_server  # noqa: E402

__all__ = [
    "DEV_CREDENTIALS",
    "SERVICES",
    "StackConfig",
    "StackError",
    "StackInfo",
    "default_state_dir",
    "down",
    "main",
    "port_is_free",
    "ray_auth_headers",
    "read_env_file",
    "read_pid_records",
    "status",
    "up",
]

SERVICES = ("s3", "mlflow", "ray")
HOST = "127.0.0.1"
# Fake credentials for the local moto endpoint. They are not secrets: moto accepts anything,
# and real AWS rejects them, so a mis-pointed client fails loudly instead of writing to AWS.
DEV_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Ray flags whose defaults are fixed ports (10001, 52365, 10002-19999) or random ones; tests set
# all of them so two clusters on one machine never collide. Keys are `ray start` flag names.
RAY_AUX_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
STOP_GRACE_S = 5.0  # GCS ignores SIGTERM for ~minutes once its metrics agent is gone (measured)


class StackError(RuntimeError):
    """The stack could not be brought to the requested state; the message says what to do."""


def default_state_dir() -> Path:
    """`$SAGAN_STATE_DIR`, else `<repo>/.state` (git-ignored), so every tool finds one stack."""
    env = os.environ.get("SAGAN_STATE_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".state"


def _short_ray_temp_dir(state_dir: Path) -> str:
    """A short, per-state-dir Ray temp dir: Ray puts unix sockets under it and a socket path
    must stay under 108 bytes, so a long pytest tmp path cannot be used directly."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"/tmp/ray_sagan_{digest}"


@dataclass
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses.

    Defaults are fixed, memorable ports for a developer machine; tests use `with_free_ports`.
    """

    state_dir: Path = field(default_factory=default_state_dir)
    s3_port: int = 9000
    mlflow_port: int = 5000
    ray_gcs_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_aux_ports: dict[str, int] = field(default_factory=dict)  # flag name -> port
    ray_worker_ports: tuple[int, int] | None = None  # (min, max); None = Ray's 10002-19999
    ray_num_cpus: int | None = None  # None = detected cores
    ray_object_store_mb: int = 1024  # Ray's default (30% of RAM) is far more than we need
    ray_temp_dir: str | None = None  # None = /tmp/ray_sagan_<hash of state dir>
    bucket: str = "sagan"

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.ray_temp_dir is None:
            self.ray_temp_dir = _short_ray_temp_dir(self.state_dir)
        if self.ray_worker_ports is not None:
            self.ray_worker_ports = (int(self.ray_worker_ports[0]), int(self.ray_worker_ports[1]))

    @classmethod
    def with_free_ports(cls, state_dir: Path | str, **overrides: Any) -> StackConfig:
        """A config whose every port (Ray's auxiliary ports and a worker-port range included)
        is currently free, so the stack can run beside any other Ray/MLflow/S3 on the host."""
        ports = _free_ports(4 + len(RAY_AUX_PORT_FLAGS))
        values: dict[str, Any] = {
            "s3_port": ports[0],
            "mlflow_port": ports[1],
            "ray_gcs_port": ports[2],
            "ray_dashboard_port": ports[3],
            "ray_aux_ports": dict(zip(RAY_AUX_PORT_FLAGS, ports[4:], strict=True)),
            "ray_worker_ports": _free_port_range(100),
        }
        values.update(overrides)
        return cls(state_dir=Path(state_dir), **values)

    # -- derived addresses -------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        """The job-server (dashboard) address: what `ray job submit --address` takes."""
        return f"http://{HOST}:{self.ray_dashboard_port}"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env"

    def all_ports(self) -> list[int]:
        """Every fixed port the stack listens on (the worker range excluded)."""
        return [self.s3_port, self.mlflow_port, self.ray_gcs_port, self.ray_dashboard_port,
                *self.ray_aux_ports.values()]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_dir"] = str(self.state_dir)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StackConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class StackInfo:
    """Addresses of a running stack; what tests and scripts need to talk to it."""

    state_dir: Path
    ray_address: str  # http://127.0.0.1:PORT, for `ray job submit` / JobSubmissionClient
    ray_gcs_address: str  # NODE_IP:PORT, for ray.init(address=...) from this machine
    ray_dashboard_url: str
    mlflow_uri: str
    s3_endpoint: str
    bucket: str
    env_file: Path
    env: dict[str, str]
    pids: dict[str, int]
    config: StackConfig

    def ray_headers(self) -> dict[str, str]:
        """Auth header for in-process JobSubmissionClient / HTTP calls to `ray_address`."""
        return ray_auth_headers()

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) plus the stack's variables, for subprocess(env=...)."""
        merged = dict(os.environ if base is None else base)
        merged.update(self.env)
        return merged


# --------------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------------
def port_is_free(port: int, host: str = HOST) -> bool:
    """True if nothing listens on `port`. SO_REUSEADDR so lingering TIME_WAIT connections of a
    server we just stopped do not count as 'in use' (a listening socket still does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all probe sockets are held open together so none repeats."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(size: int, lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """A free contiguous range for Ray workers, below the kernel's ephemeral range (32768+) so
    outgoing connections do not take them, and away from Ray's default 10002-19999."""
    rng = random.Random()
    for _ in range(50):
        start = rng.randrange(lo, hi - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise StackError(f"no free range of {size} ports in {lo}-{hi}")


# --------------------------------------------------------------------------------------------
# processes we own
# --------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start_ticks) of `pid` from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # comm may contain spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    """Collect `pid` if it is our exited child (in-process use from tests), else do nothing."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[1] == pgid and st[0] != "Z":
                out.append(int(entry))
    return out


@dataclass
class PidRecord:
    """What `<state>/pids/<service>.json` holds: enough to find exactly our process group."""

    service: str
    pid: int  # leader; started with a new session, so it is also the pgid
    start_ticks: int  # /proc/<pid>/stat field 22: distinguishes a recycled pid
    cmd: list[str]
    log: str

    def leader_alive(self) -> bool:
        st = _proc_stat(self.pid)
        if st is not None and st[0] == "Z":
            _reap(self.pid)
        return st is not None and st[2] == self.start_ticks and st[0] != "Z"

    def group_is_ours(self) -> bool:
        """Whether processes in group `pid` are still ours. Linux never hands out a pid that is
        still some process's pgid, so: if the leader is gone (or a zombie of ours), any member
        left in that group is ours; if `pid` now names a different process, our group is gone."""
        st = _proc_stat(self.pid)
        return st is None or st[2] == self.start_ticks

    def members(self) -> list[int]:
        return _group_members(self.pid) if self.group_is_ours() else []


def _pid_path(state_dir: Path, service: str) -> Path:
    return state_dir / "pids" / f"{service}.json"


def _write_pid_record(state_dir: Path, service: str, pid: int, cmd: list[str],
                      log: Path) -> PidRecord:
    st = _proc_stat(pid)
    if st is None:
        raise StackError(f"{service} exited immediately; see {log}")
    rec = PidRecord(service=service, pid=pid, start_ticks=st[2], cmd=cmd, log=str(log))
    path = _pid_path(state_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(rec), indent=2))
    os.replace(tmp, path)
    return rec


def read_pid_records(state_dir: Path | str) -> dict[str, PidRecord]:
    """The recorded services of the stack in `state_dir` (missing ones are absent)."""
    out = {}
    for service in SERVICES:
        path = _pid_path(Path(state_dir), service)
        if path.exists():
            out[service] = PidRecord(**json.loads(path.read_text()))
    return out


def _stop_groups(recs: list[PidRecord], grace: float = STOP_GRACE_S) -> dict[str, list[int]]:
    """SIGTERM our process groups, SIGKILL whatever is left after `grace` s; return leftovers
    per service. All groups are signalled together so `down` costs one grace period, not three.

    A dev stack holds nothing worth a long drain: the S3 data is in memory, MLflow commits
    every request to sqlite, and Ray jobs are lost anyway when the cluster goes.
    """
    ours = [r for r in recs if r.group_is_ours()]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        live = [r for r in ours if r.members()]
        for rec in live:
            try:
                os.killpg(rec.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            for rec in live:
                _reap(rec.pid)
            live = [r for r in live if r.members()]
            if live:
                time.sleep(0.1)
    for rec in ours:
        _reap(rec.pid)
    return {r.service: r.members() for r in recs}


def _stop_group(rec: PidRecord, grace: float = STOP_GRACE_S) -> list[int]:
    """`_stop_groups` for one service; returns the pids still alive (normally none)."""
    return _stop_groups([rec], grace)[rec.service]


# --------------------------------------------------------------------------------------------
# health checks
# --------------------------------------------------------------------------------------------
def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def ray_auth_headers() -> dict[str, str]:
    """The bearer header for the stack's Ray dashboard/job API (the stack runs Ray with token
    auth). For in-process clients whose RAY_AUTH_MODE is not 'token', e.g.
    `JobSubmissionClient(info.ray_address, headers=ray_auth_headers())`."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_s3(cfg: StackConfig) -> str | None:
    """None when ListBuckets works and our bucket exists, else the reason."""
    import boto3  # lazy: the CLI's --help and `down` should not pay for importing boto3
    from botocore.config import Config as BotoConfig

    try:
        client = boto3.client("s3", endpoint_url=cfg.s3_endpoint,
                              config=BotoConfig(retries={"max_attempts": 1},
                                                connect_timeout=2, read_timeout=5),
                              aws_access_key_id=DEV_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=DEV_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                              region_name=DEV_CREDENTIALS["AWS_DEFAULT_REGION"])
        names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy", with its reason
        return f"ListBuckets failed: {exc}"
    return None if cfg.bucket in names else f"bucket {cfg.bucket!r} missing (have {names})"


def check_mlflow(cfg: StackConfig) -> str | None:
    """None when GET /health answers OK."""
    try:
        body = _http_get(cfg.mlflow_uri + "/health")
    except (OSError, urllib.error.URLError) as exc:
        return f"GET /health failed: {exc}"
    return None if body.strip() == b"OK" else f"GET /health said {body[:100]!r}"


def check_ray(cfg: StackConfig) -> str | None:
    """None when the dashboard answers /api/version and the job API lists jobs."""
    headers = ray_auth_headers()
    try:
        version = json.loads(_http_get(cfg.ray_address + "/api/version", headers))
        json.loads(_http_get(cfg.ray_address + "/api/jobs/", headers))
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return f"dashboard/job API not answering: {exc}"
    return None if "ray_version" in version else f"unexpected /api/version: {version}"


CHECKS: dict[str, Callable[[StackConfig], str | None]] = {
    "s3": check_s3, "mlflow": check_mlflow, "ray": check_ray,
}


def _ensure_bucket(cfg: StackConfig) -> None:
    """Create the bucket MLflow's artifact proxy and the data shards live in (idempotent)."""
    import boto3

    client = boto3.client("s3", endpoint_url=cfg.s3_endpoint,
                          aws_access_key_id=DEV_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=DEV_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                          region_name=DEV_CREDENTIALS["AWS_DEFAULT_REGION"])
    try:
        client.create_bucket(Bucket=cfg.bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


# --------------------------------------------------------------------------------------------
# commands and environment
# --------------------------------------------------------------------------------------------
def _venv_bin() -> Path:
    """The bin dir of the interpreter running us (the repo venv, via infra/local/up)."""
    return Path(sys.executable).parent


def _tool(name: str) -> str:
    local = _venv_bin() / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; "
                         "install the project: pip install -e '.[dev]'")
    return found


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """The variables the env file exports: every client (and the Ray job) reads these.

    Two Ray addresses, because Ray's two clients read different variables: `ray job ...` and
    JobSubmissionClient take RAY_API_SERVER_ADDRESS (the http job server) before RAY_ADDRESS,
    while ray.init() / `ray status` need RAY_ADDRESS to be the GCS address and refuse an http
    one. So after `source env` both `ray job submit` and `python pipelines/train.py` work.
    RAY_AUTH_MODE=token: see `_ensure_ray_token`; clients only send the token in that mode.
    """
    return {
        "RAY_ADDRESS": _gcs_address(cfg),
        "RAY_API_SERVER_ADDRESS": cfg.ray_address,
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": cfg.mlflow_uri,
        "AWS_ENDPOINT_URL_S3": cfg.s3_endpoint,
        **DEV_CREDENTIALS,
        "SAGAN_DATA_BUCKET": cfg.bucket,
        "SAGAN_STATE_DIR": str(cfg.state_dir),
    }


def _service_env(cfg: StackConfig, service: str) -> dict[str, str]:
    """Environment for a service process.

    Ray's job entrypoints and workers inherit the raylet's environment: the venv's bin comes
    first on PATH so `python pipelines/train.py` in a job is the project interpreter, and the
    stack variables are set so jobs reach MLflow and S3 without any runtime_env plumbing.
    RAY_ADDRESS is left out: inside the cluster Ray sets it to the GCS address itself.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({k: v for k, v in stack_env(cfg).items() if not k.startswith("RAY_")})
    env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if service == "ray":
        env["RAY_AUTH_MODE"] = "token"
    if service == "mlflow":
        env["MLFLOW_S3_ENDPOINT_URL"] = cfg.s3_endpoint  # the server-side artifact proxy
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey consumer: faster, less RAM
    return env


def _mlflow_cmd(cfg: StackConfig) -> list[str]:
    db = cfg.state_dir / "mlflow" / "mlflow.db"
    return [
        _tool("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--serve-artifacts",
        "--artifacts-destination", f"s3://{cfg.bucket}/mlflow",
        "--host", HOST, "--port", str(cfg.mlflow_port),
        "--workers", "1",
        # Host-header allow-list (DNS-rebinding protection): loopback only, on our port.
        "--allowed-hosts", f"127.0.0.1:{cfg.mlflow_port},localhost:{cfg.mlflow_port},"
                           "127.0.0.1,localhost",
    ]


def _ray_cmd(cfg: StackConfig) -> list[str]:
    cmd = [
        _tool("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--temp-dir", str(cfg.ray_temp_dir),
        "--port", str(cfg.ray_gcs_port),
        "--include-dashboard", "true",
        "--dashboard-host", HOST, "--dashboard-port", str(cfg.ray_dashboard_port),
        "--object-store-memory", str(cfg.ray_object_store_mb * 1024 * 1024),
    ]
    for flag, port in cfg.ray_aux_ports.items():
        cmd += [f"--{flag}", str(port)]
    if cfg.ray_worker_ports is not None:
        cmd += ["--min-worker-port", str(cfg.ray_worker_ports[0]),
                "--max-worker-port", str(cfg.ray_worker_ports[1])]
    if cfg.ray_num_cpus is not None:
        cmd += ["--num-cpus", str(cfg.ray_num_cpus)]
    return cmd


def _ensure_ray_token() -> None:
    """Make sure a Ray auth token exists before starting Ray in token mode.

    Why token mode always: Ray's GCS/raylet gRPC servers listen on every interface whatever
    --dashboard-host says, and with RAY_AUTH_MODE unset `ray start` silently turns token auth on
    or off depending on whether ~/.ray/auth_token happens to exist. Fixing the mode makes the
    stack behave the same on every machine and keeps other hosts from submitting work. The token
    lives where Ray keeps it (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]); it is never printed.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if path.is_file() and path.read_text().strip():
        return
    res = subprocess.run([_tool("ray"), "get-auth-token", "--generate"], capture_output=True,
                         text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if res.returncode != 0:
        raise StackError(f"could not create a Ray auth token: {res.stderr.strip()[-500:]}")


def _spawn(cfg: StackConfig, service: str, cmd: list[str]) -> PidRecord:
    """Start `cmd` as the leader of a new session, logging to <state>/logs/<service>.log."""
    log = cfg.state_dir / "logs" / f"{service}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=_service_env(cfg, service), cwd=cfg.state_dir,
                                start_new_session=True)
    return _write_pid_record(cfg.state_dir, service, proc.pid, cmd, log)


def _log_tail(path: str | Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def _gcs_address(cfg: StackConfig) -> str:
    """NODE_IP:PORT as Ray itself records it; Ray resolves 127.0.0.1 to the node's routable IP,
    and ray.init() only finds the local raylet when it is given that same address."""
    path = Path(str(cfg.ray_temp_dir)) / "ray_current_cluster"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return f"{HOST}:{cfg.ray_gcs_port}"


def write_env_file(cfg: StackConfig) -> Path:
    """Write `<state>/env` as `export K=V` lines (shell-quoted) so `source` works in bash/zsh."""
    env = stack_env(cfg)
    lines = ["# Written by infra/local/stack.py up; `source` it. Removed by `down`."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    tmp = cfg.env_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, cfg.env_file)
    return cfg.env_file


def read_env_file(path: Path | str) -> dict[str, str]:
    """Parse an env file written by `write_env_file` (for tests and tools that cannot source)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            parts = shlex.split(value)
            out[key] = parts[0] if parts else ""
    return out


# --------------------------------------------------------------------------------------------
# up / down / status
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state dir: two `make quickstart`s started together must end
    with one stack (the second waits, then finds it healthy), not two racing for the ports."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _config_path(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def load_config(state_dir: Path | str) -> StackConfig | None:
    """The config the stack in `state_dir` was last started with, if any."""
    path = _config_path(Path(state_dir).expanduser().resolve())
    return StackConfig.from_json(json.loads(path.read_text())) if path.exists() else None


def _info(cfg: StackConfig) -> StackInfo:
    recs = read_pid_records(cfg.state_dir)
    return StackInfo(
        state_dir=cfg.state_dir, ray_address=cfg.ray_address, ray_gcs_address=_gcs_address(cfg),
        ray_dashboard_url=cfg.ray_address, mlflow_uri=cfg.mlflow_uri,
        s3_endpoint=cfg.s3_endpoint, bucket=cfg.bucket, env_file=cfg.env_file,
        env=read_env_file(cfg.env_file) if cfg.env_file.exists() else stack_env(cfg),
        pids={name: rec.pid for name, rec in recs.items()}, config=cfg)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _start_s3(cfg: StackConfig) -> PidRecord:
    """Start moto via infra/local/s3.py (shared with the data tests) and record its pid."""
    log = cfg.state_dir / "logs" / "s3.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc, endpoint = start_s3_server(HOST, cfg.s3_port, log_path=log)
    if endpoint != cfg.s3_endpoint:  # pragma: no cover - start_s3_server honours the port
        raise StackError(f"S3 came up at {endpoint}, expected {cfg.s3_endpoint}")
    return _write_pid_record(cfg.state_dir, "s3", proc.pid, list(map(str, proc.args)), log)


def _port_owners_message(cfg: StackConfig, service: str) -> str | None:
    """Which of the service's ports are taken by someone else (before we start it)."""
    ports = {
        "s3": [cfg.s3_port],
        "mlflow": [cfg.mlflow_port],
        "ray": [cfg.ray_gcs_port, cfg.ray_dashboard_port, *cfg.ray_aux_ports.values()],
    }[service]
    taken = [p for p in ports if not port_is_free(p)]
    if not taken:
        return None
    return (f"{service}: port(s) {taken} on {HOST} are in use by another process. Stop it, pick "
            "other ports (see --help), or use `up --free-ports`.")


def up(cfg: StackConfig | None = None, *, timeout: float = 180.0, quiet: bool = False) -> StackInfo:
    """Bring the stack to 'all three healthy' and write the env file; idempotent.

    Services already running and healthy are left alone (same pids); dead ones are restarted
    on the same ports. On failure, whatever this call started is stopped again, so a failed
    `up` (or a failed test fixture) leaves no stray processes behind.
    """
    cfg = cfg or load_config(default_state_dir()) or StackConfig()
    with _state_lock(cfg.state_dir):
        return _up_locked(cfg, timeout, quiet)


def _up_locked(cfg: StackConfig, timeout: float, quiet: bool) -> StackInfo:
    (cfg.state_dir / "mlflow").mkdir(exist_ok=True)
    recs = read_pid_records(cfg.state_dir)

    previous = load_config(cfg.state_dir)
    if previous is not None and any(r.leader_alive() for r in recs.values()):
        if previous.to_json() != cfg.to_json():
            raise StackError(f"a stack with a different configuration is running from "
                             f"{cfg.state_dir}; run `down` first (or omit the port options "
                             "to reuse the running one)")
    _config_path(cfg.state_dir).write_text(json.dumps(cfg.to_json(), indent=2))

    started: list[PidRecord] = []
    t0 = time.monotonic()
    try:
        # A leader that is alive but unhealthy (e.g. killed S3 child, wedged server) is
        # replaced; one that is alive and healthy is kept.
        todo: list[str] = []
        for service in SERVICES:
            rec = recs.get(service)
            if rec is not None and rec.leader_alive():
                if service == "s3":
                    try:  # a live S3 that lost its bucket needs the bucket, not a restart
                        _ensure_bucket(cfg)
                    except Exception:  # noqa: BLE001 - the health check below reports it
                        pass
                problem = CHECKS[service](cfg)
                if problem is None:
                    _say(f"[{service:6}] already running (pid {rec.pid})", quiet)
                    continue
                _say(f"[{service:6}] running but unhealthy ({problem}); restarting", quiet)
                _stop_group(rec)
            elif rec is not None:
                leftovers = _stop_group(rec)  # orphans of a crashed leader, if any
                if leftovers:
                    raise StackError(f"could not stop leftovers of {service}: {leftovers}")
            todo.append(service)

        for service in todo:
            msg = _port_owners_message(cfg, service)
            if msg:
                raise StackError(msg)

        if "s3" in todo:
            _say(f"[s3    ] starting moto S3 on {cfg.s3_endpoint} ...", quiet)
            started.append(_start_s3(cfg))
        _ensure_bucket(cfg)
        if "s3" in todo:
            _say(f"[s3    ] healthy; bucket s3://{cfg.bucket} ready "
                 f"({time.monotonic() - t0:.1f}s)", quiet)

        # MLflow and Ray are slow starters (~10 s each on 2 cores): launch both, then wait.
        pending: dict[str, PidRecord] = {}
        if "mlflow" in todo:
            _say(f"[mlflow] starting MLflow server on {cfg.mlflow_uri} (sqlite in "
                 f"{cfg.state_dir / 'mlflow'}, artifacts -> s3://{cfg.bucket}/mlflow) ...", quiet)
            pending["mlflow"] = _spawn(cfg, "mlflow", _mlflow_cmd(cfg))
            started.append(pending["mlflow"])
        if "ray" in todo:
            _ensure_ray_token()
            _say(f"[ray   ] starting Ray head: GCS port {cfg.ray_gcs_port}, dashboard/jobs "
                 f"{cfg.ray_address}, temp dir {cfg.ray_temp_dir} ...", quiet)
            pending["ray"] = _spawn(cfg, "ray", _ray_cmd(cfg))
            started.append(pending["ray"])

        deadline = time.monotonic() + timeout
        last: dict[str, str | None] = {}
        while pending:
            for service, rec in list(pending.items()):
                if not rec.leader_alive():
                    raise StackError(f"{service} exited during startup; last log lines "
                                     f"({rec.log}):\n{_log_tail(rec.log)}")
                last[service] = CHECKS[service](cfg)
                if last[service] is None:
                    _say(f"[{service:6}] healthy ({time.monotonic() - t0:.1f}s)", quiet)
                    del pending[service]
            if pending and time.monotonic() > deadline:
                details = "; ".join(f"{s}: {last.get(s)}" for s in pending)
                logs = "\n".join(f"  {s} log {r.log}:\n{_log_tail(r.log)}"
                                 for s, r in pending.items())
                raise StackError(f"not healthy after {timeout:.0f}s: {details}\n{logs}")
            time.sleep(0.5)

        write_env_file(cfg)
    except BaseException:
        for rec in reversed(started):
            _stop_group(rec)
            _pid_path(cfg.state_dir, rec.service).unlink(missing_ok=True)
        raise

    info = _info(cfg)
    _say(_summary(info), quiet)
    return info


def _summary(info: StackInfo) -> str:
    return "\n".join([
        "",
        "Local stack is up:",
        f"  Ray jobs / dashboard  {info.ray_address}   (GCS {info.ray_gcs_address})",
        f"  MLflow UI / API       {info.mlflow_uri}",
        f"  S3 (moto)             {info.s3_endpoint}   bucket s3://{info.bucket}",
        f"  env file              {info.env_file}",
        "",
        f"  source {shlex.quote(str(info.env_file))}",
        "  ray job submit --working-dir . -- python pipelines/train.py",
    ])


def down(state_dir: Path | str | None = None, *, purge: bool = False,
         quiet: bool = False) -> dict[str, list[int]]:
    """Stop exactly the process groups recorded in `state_dir`; return leftovers per service
    (empty lists when everything is gone). `purge` also deletes the state dir (MLflow database,
    logs) and Ray's temp dir. Safe to call when nothing runs."""
    state = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    if not state.is_dir():
        _say("Local stack is down (no state dir).", quiet)
        return {}
    with _state_lock(state):
        leftovers = _down_locked(state, quiet)
    if purge and not any(leftovers.values()):
        cfg = load_config(state)
        if cfg is not None and cfg.ray_temp_dir and Path(cfg.ray_temp_dir).is_dir():
            shutil.rmtree(cfg.ray_temp_dir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    _say("Local stack is down." if not any(leftovers.values()) else
         "Local stack is down, with leftovers (see above).", quiet)
    return leftovers


def _down_locked(state: Path, quiet: bool) -> dict[str, list[int]]:
    cfg = load_config(state)
    recs = read_pid_records(state)
    for service, rec in recs.items():
        if rec.leader_alive() or rec.members():
            _say(f"[{service:6}] stopping process group {rec.pid} ...", quiet)
    leftovers = _stop_groups(list(recs.values()))
    for service, left in leftovers.items():
        if left:
            _say(f"[{service:6}] WARNING: still running after SIGKILL: {left}", quiet)
        else:
            _pid_path(state, service).unlink(missing_ok=True)
    if cfg is not None:
        cfg.env_file.unlink(missing_ok=True)  # stale addresses would mislead clients
        busy = [p for p in cfg.all_ports() if not port_is_free(p)]
        if busy and not any(leftovers.values()):
            _say(f"note: port(s) {busy} are in use, but not by this stack's processes", quiet)
    return leftovers


def status(state_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """Per service: running (leader alive), healthy (health check passed), pid, detail."""
    state = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    cfg = load_config(state)
    recs = read_pid_records(state)
    out: dict[str, dict[str, Any]] = {}
    for service in SERVICES:
        rec = recs.get(service)
        running = rec is not None and rec.leader_alive()
        problem = CHECKS[service](cfg) if (running and cfg is not None) else "not running"
        address = None
        if cfg is not None:
            address = {"s3": cfg.s3_endpoint, "mlflow": cfg.mlflow_uri,
                       "ray": cfg.ray_address}[service]
        out[service] = {"running": running, "healthy": problem is None,
                        "pid": rec.pid if rec else None, "address": address, "detail": problem}
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _config_from_args(args: argparse.Namespace) -> StackConfig:
    """Explicit options > the config recorded in the state dir > defaults (or free ports)."""
    state = Path(args.state_dir).expanduser().resolve() if args.state_dir else default_state_dir()
    recorded = load_config(state)
    running = any(r.leader_alive() for r in read_pid_records(state).values())
    if args.free_ports and not running:  # a running stack keeps its ports
        base = StackConfig.with_free_ports(state)
    else:
        base = recorded or StackConfig(state_dir=state)
    overrides = {k: v for k, v in {
        "s3_port": args.s3_port, "mlflow_port": args.mlflow_port,
        "ray_gcs_port": args.ray_port, "ray_dashboard_port": args.dashboard_port,
        "ray_num_cpus": args.num_cpus, "ray_object_store_mb": args.object_store_mb,
        "bucket": args.bucket,
    }.items() if v is not None}
    return dataclasses.replace(base, **overrides)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infra/local/stack.py",
        description="Local stack on 127.0.0.1: moto S3, MLflow server (sqlite, artifacts "
                    "proxied to S3) and a Ray head with the job server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  infra/local/up && source .state/env\n"
               "  infra/local/up --free-ports --state-dir /tmp/mystack\n"
               "  python infra/local/stack.py status --json\n"
               "  infra/local/down --purge        # also delete the MLflow DB and logs\n")
    sub = p.add_subparsers(dest="command", required=True)

    def add_state(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=None,
                        help="state directory (default: $SAGAN_STATE_DIR or <repo>/.state)")

    up_p = sub.add_parser("up", help="start the stack (no-op for services already healthy)")
    add_state(up_p)
    up_p.add_argument("--s3-port", type=int, help="S3 (moto) port (default 9000)")
    up_p.add_argument("--mlflow-port", type=int, help="MLflow server port (default 5000)")
    up_p.add_argument("--ray-port", type=int, help="Ray GCS port (default 6379)")
    up_p.add_argument("--dashboard-port", type=int,
                      help="Ray dashboard / job server port (default 8265)")
    up_p.add_argument("--free-ports", action="store_true",
                      help="when the stack is not running, pick free ports for everything "
                           "(incl. Ray's internal ports) instead of the defaults/recorded ones")
    up_p.add_argument("--num-cpus", type=int, help="logical CPUs Ray offers (default: cores)")
    up_p.add_argument("--object-store-mb", type=int, help="Ray object store size (default 1024)")
    up_p.add_argument("--bucket", help="S3 bucket for data and MLflow artifacts (default sagan)")
    up_p.add_argument("--timeout", type=float, default=180.0,
                      help="seconds to wait for health (default 180)")
    up_p.add_argument("--quiet", action="store_true", help="print only errors")

    down_p = sub.add_parser("down", help="stop exactly the processes `up` started")
    add_state(down_p)
    down_p.add_argument("--purge", action="store_true",
                        help="also delete the state dir (MLflow DB, logs) and Ray's temp dir")
    down_p.add_argument("--quiet", action="store_true")

    st_p = sub.add_parser("status", help="show each service; exit 0 only if all are healthy")
    add_state(st_p)
    st_p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "up":
            state = (Path(args.state_dir).expanduser().resolve() if args.state_dir
                     else default_state_dir())
            with _state_lock(state):  # resolve the config under the lock: a concurrent `up`
                cfg = _config_from_args(args)  # may be recording the stack right now
                _up_locked(cfg, args.timeout, args.quiet)
            return 0
        if args.command == "down":
            leftovers = down(args.state_dir, purge=args.purge, quiet=args.quiet)
            return 1 if any(leftovers.values()) else 0
        report = status(args.state_dir)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for service, s in report.items():
                state = "healthy" if s["healthy"] else ("UNHEALTHY" if s["running"] else "down")
                extra = "" if s["healthy"] else f"  ({s['detail']})"
                print(f"{service:7} {state:9} pid={s['pid']}  {s['address']}{extra}")
        return 0 if all(s["healthy"] for s in report.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
