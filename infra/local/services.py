"""The services of the local stack, one class each: command, environment, health check.

`up` starts the services of one wave together and waits until all of them are healthy before
the next wave (S3 first: it is MLflow's artifact store). Adding a service (e.g. more Ray
nodes) means adding a class here and listing it in `services_for`; up/down/status and the
env file pick it up from there.

Every service inherits the stack's client variables (`stack_env`) and the venv's `bin` first on
PATH: Ray's job entrypoints and workers inherit the raylet's environment, so
`python pipelines/train.py` in a job is the project interpreter and reaches MLflow and S3
without any runtime_env plumbing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from infra.local.config import HOST, StackConfig, StackError
from infra.local.s3 import server_command

# Fake credentials for the local moto endpoint. They are not secrets: moto accepts anything,
# and real AWS rejects them, so a mis-pointed client fails loudly instead of writing to AWS.
DEV_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def tool(name: str) -> str:
    """`name` from the bin dir of the interpreter running us (the repo venv), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; "
                         "install the project: pip install -e '.[dev]'")
    return found


def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


class Service:
    """One process group of the stack. Subclasses fill in what differs."""

    name = ""
    wave = 0  # services of one wave start together, after every earlier wave is healthy
    stop_grace_s = 5.0  # SIGTERM -> SIGKILL

    def ports(self, cfg: StackConfig) -> list[int]:
        raise NotImplementedError

    def address(self, cfg: StackConfig) -> str:
        raise NotImplementedError

    def command(self, cfg: StackConfig) -> list[str]:
        raise NotImplementedError

    def check(self, cfg: StackConfig) -> str | None:
        """None when healthy, else the reason."""
        raise NotImplementedError

    def client_env(self, cfg: StackConfig) -> dict[str, str]:
        """What the env file exports so clients reach this service."""
        return {}

    def extra_env(self, cfg: StackConfig) -> dict[str, str]:
        """Variables only this service's own process needs."""
        return {}

    def starting(self, cfg: StackConfig) -> str:
        """The progress line `up` prints when it starts the service."""
        return f"starting {self.name} on {self.address(cfg)} ..."

    def before_start(self, cfg: StackConfig) -> None:
        """Preparation before the process is spawned."""

    def settle(self, cfg: StackConfig) -> None:
        """Best-effort fix-ups `up` makes before each health check (not `status`)."""


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------
def s3_client(cfg: StackConfig, **client_config: Any):
    """The one boto3 client for the stack's S3 (its endpoint and credentials). Keyword
    arguments go to botocore's Config (e.g. retries, timeouts)."""
    import boto3  # lazy: the CLI's --help and `down` should not pay for importing boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=cfg.s3_endpoint,
                        config=BotoConfig(**client_config),
                        aws_access_key_id=DEV_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=DEV_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=DEV_CREDENTIALS["AWS_DEFAULT_REGION"])


class S3(Service):
    name = "s3"

    def ports(self, cfg: StackConfig) -> list[int]:
        return [cfg.s3_port]

    def address(self, cfg: StackConfig) -> str:
        return cfg.s3_endpoint

    def command(self, cfg: StackConfig) -> list[str]:
        return server_command(HOST, cfg.s3_port)

    def starting(self, cfg: StackConfig) -> str:
        return f"starting moto S3 on {cfg.s3_endpoint} (bucket s3://{cfg.bucket}) ..."

    def client_env(self, cfg: StackConfig) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": cfg.s3_endpoint, **DEV_CREDENTIALS,
                "SAGAN_DATA_BUCKET": cfg.bucket}

    def settle(self, cfg: StackConfig) -> None:
        """Create the bucket MLflow's artifact proxy and the data shards live in: a live S3
        that lost its bucket needs the bucket, not a restart."""
        try:
            client = s3_client(cfg, retries={"max_attempts": 1}, connect_timeout=2)
            client.create_bucket(Bucket=cfg.bucket)
        except Exception:  # noqa: BLE001 - already there, or not up yet: the check reports it
            pass

    def check(self, cfg: StackConfig) -> str | None:
        """None when ListBuckets works and our bucket exists, else the reason."""
        try:
            client = s3_client(cfg, retries={"max_attempts": 1}, connect_timeout=2,
                               read_timeout=5)
            names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy", with its reason
            return f"ListBuckets failed: {exc}"
        return None if cfg.bucket in names else f"bucket {cfg.bucket!r} missing (have {names})"


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------
class MLflow(Service):
    name = "mlflow"
    wave = 1

    def ports(self, cfg: StackConfig) -> list[int]:
        return [cfg.mlflow_port]

    def address(self, cfg: StackConfig) -> str:
        return cfg.mlflow_uri

    def command(self, cfg: StackConfig) -> list[str]:
        db = cfg.state_dir / "mlflow" / "mlflow.db"
        return [
            tool("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{db}",
            "--serve-artifacts",
            "--artifacts-destination", f"s3://{cfg.bucket}/mlflow",
            "--host", HOST, "--port", str(cfg.mlflow_port),
            "--workers", "1",
            # Host-header allow-list (DNS-rebinding protection): loopback only, on our port.
            "--allowed-hosts", f"127.0.0.1:{cfg.mlflow_port},localhost:{cfg.mlflow_port},"
                               "127.0.0.1,localhost",
        ]

    def starting(self, cfg: StackConfig) -> str:
        return (f"starting MLflow server on {cfg.mlflow_uri} (sqlite in "
                f"{cfg.state_dir / 'mlflow'}, artifacts -> s3://{cfg.bucket}/mlflow) ...")

    def client_env(self, cfg: StackConfig) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": cfg.mlflow_uri}

    def before_start(self, cfg: StackConfig) -> None:
        (cfg.state_dir / "mlflow").mkdir(exist_ok=True)

    def extra_env(self, cfg: StackConfig) -> dict[str, str]:
        return {"MLFLOW_S3_ENDPOINT_URL": cfg.s3_endpoint,  # the server-side artifact proxy
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey consumer: less RAM

    def check(self, cfg: StackConfig) -> str | None:
        """None when GET /health answers OK."""
        try:
            body = _http_get(cfg.mlflow_uri + "/health")
        except (OSError, urllib.error.URLError) as exc:
            return f"GET /health failed: {exc}"
        return None if body.strip() == b"OK" else f"GET /health said {body[:100]!r}"


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------
def _ray_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ray_auth_headers() -> dict[str, str]:
    """The bearer header for the stack's Ray dashboard/job API (the stack runs Ray with token
    auth). For in-process clients whose RAY_AUTH_MODE is not 'token', e.g.
    `JobSubmissionClient(info.ray_address, headers=ray_auth_headers())`."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = _ray_token_path()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def gcs_address(cfg: StackConfig) -> str:
    """NODE_IP:PORT as Ray itself records it; Ray resolves 127.0.0.1 to the node's routable IP,
    and ray.init() only finds the local raylet when it is given that same address."""
    path = Path(str(cfg.ray_temp_dir)) / "ray_current_cluster"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return f"{HOST}:{cfg.ray_gcs_port}"


class RayHead(Service):
    """`ray start --head --block`: its whole process tree (GCS, raylet, dashboard, agents and
    every worker the raylet forks) stays inside the group of the process we launch, with a
    private `--temp-dir` and explicit ports so it cannot touch another cluster."""

    name = "ray"
    wave = 1

    def ports(self, cfg: StackConfig) -> list[int]:
        return [cfg.ray_gcs_port, cfg.ray_dashboard_port, *cfg.ray_aux_ports.values()]

    def address(self, cfg: StackConfig) -> str:
        return cfg.ray_address

    def command(self, cfg: StackConfig) -> list[str]:
        cmd = [
            tool("ray"), "start", "--head", "--block", "--disable-usage-stats",
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

    def starting(self, cfg: StackConfig) -> str:
        return (f"starting Ray head: GCS port {cfg.ray_gcs_port}, dashboard/jobs "
                f"{cfg.ray_address}, temp dir {cfg.ray_temp_dir} ...")

    def client_env(self, cfg: StackConfig) -> dict[str, str]:
        """Two Ray addresses, because Ray's two clients read different variables: `ray job ...`
        and JobSubmissionClient take RAY_API_SERVER_ADDRESS (the http job server) before
        RAY_ADDRESS, while ray.init() / `ray status` need RAY_ADDRESS to be the GCS address and
        refuse an http one. RAY_AUTH_MODE=token: clients only send the token in that mode."""
        return {"RAY_ADDRESS": gcs_address(cfg), "RAY_API_SERVER_ADDRESS": cfg.ray_address,
                "RAY_AUTH_MODE": "token"}

    def extra_env(self, cfg: StackConfig) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token"}

    def before_start(self, cfg: StackConfig) -> None:
        """Make sure a Ray auth token exists before starting Ray in token mode.

        Why token mode always: Ray's GCS/raylet gRPC servers listen on every interface whatever
        --dashboard-host says, and with RAY_AUTH_MODE unset `ray start` silently turns token
        auth on or off depending on whether ~/.ray/auth_token happens to exist. Fixing the mode
        makes the stack behave the same on every machine and keeps other hosts from submitting
        work. The token lives where Ray keeps it (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]);
        it is never printed.
        """
        if os.environ.get("RAY_AUTH_TOKEN"):
            return
        path = _ray_token_path()
        if path.is_file() and path.read_text().strip():
            return
        res = subprocess.run([tool("ray"), "get-auth-token", "--generate"], capture_output=True,
                             text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if res.returncode != 0:
            raise StackError(f"could not create a Ray auth token: {res.stderr.strip()[-500:]}")

    def check(self, cfg: StackConfig) -> str | None:
        """None when the dashboard answers /api/version and the job API lists jobs."""
        headers = ray_auth_headers()
        try:
            version = json.loads(_http_get(cfg.ray_address + "/api/version", headers))
            json.loads(_http_get(cfg.ray_address + "/api/jobs/", headers))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            return f"dashboard/job API not answering: {exc}"
        return None if "ray_version" in version else f"unexpected /api/version: {version}"


# --------------------------------------------------------------------------------------------
# the stack's services and their environment
# --------------------------------------------------------------------------------------------
def services_for(cfg: StackConfig) -> list[Service]:
    """The services of the stack `cfg` describes, in start order."""
    return [S3(), MLflow(), RayHead()]


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """The variables the env file exports: every client (and the Ray job) reads these."""
    env: dict[str, str] = {}
    for svc in services_for(cfg):
        env.update(svc.client_env(cfg))
    env["SAGAN_STATE_DIR"] = str(cfg.state_dir)
    return env


def service_env(cfg: StackConfig, svc: Service) -> dict[str, str]:
    """Environment for a service process: ours, plus the stack's client variables (RAY_ADDRESS
    left out: inside the cluster Ray sets it to the GCS address itself), the venv first on
    PATH, and what the service itself needs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({k: v for k, v in stack_env(cfg).items() if not k.startswith("RAY_")})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(svc.extra_env(cfg))
    return env
