"""What a local stack is: its state directory and the loopback ports of every service.

A `StackConfig` is recorded in `<state>/stack.json` by `up`, so later `up`/`down`/`status` calls
(and other tools) find the same ports. Defaults are fixed, memorable ports for a developer
machine; `StackConfig.with_free_ports` picks free ones for every port, Ray's internal ports
included, so a test stack can run beside any other Ray/MLflow/S3 on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
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
HEAD_ONLY_PORT_FLAGS = ("ray-client-server-port",)
NODE_WORKER_RANGE = ("min-worker-port", "max-worker-port")  # `ray start` flags, per node
# Ray's autoscaler and dashboard serve Prometheus metrics on fixed ports (44217, 44227) that
# no flag sets; these environment variables do. Kept in `ray_aux_ports` under these names.
RAY_METRICS_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# SeaweedFS (`weed mini`) runs master, volume server, filer, S3 gateway and an admin server in
# one process, each with an HTTP and a gRPC port; all are set explicitly (keys are weed flags).
# Its maintenance worker dials the admin's gRPC port as admin.port + 10000, so that one pair
# keeps weed's offset.
S3_AUX_PORT_FLAGS = ("s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                     "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port",
                     "admin.port.grpc")
WEED_GRPC_OFFSET = 10000


class StackError(RuntimeError):
    """The stack could not be brought to the requested state; the message says what to do."""


def default_state_dir() -> Path:
    """`$SAGAN_STATE_DIR`, else `<repo>/.state` (git-ignored), so every tool finds one stack."""
    env = os.environ.get("SAGAN_STATE_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".state"


def resolve_state_dir(state_dir: Path | str | None) -> Path:
    """An explicit state dir (absolute), or the default one."""
    return Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()


def short_temp_dir(state_dir: Path, kind: str) -> str:
    """A short, per-state-dir directory under /tmp for unix sockets: a socket path must stay
    under 108 bytes, so a long pytest tmp path cannot hold them directly."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"/tmp/{kind}_sagan_{digest}"


@dataclass
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses."""

    state_dir: Path = field(default_factory=default_state_dir)
    s3_port: int = 9000
    mlflow_port: int = 5000
    ray_gcs_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_aux_ports: dict[str, int] = field(default_factory=dict)  # flag (or env) name -> port
    s3_aux_ports: dict[str, int] = field(default_factory=dict)  # weed flag -> port; {} = pick
    ray_worker_ports: tuple[int, int] | None = None  # (min, max); None = Ray's 10002-19999
    ray_num_cpus: int | None = None  # None = detected cores
    ray_object_store_mb: int = 1024  # Ray's default (30% of RAM) is far more than we need
    ray_temp_dir: str | None = None  # None = /tmp/ray_sagan_<hash of state dir>
    ray_nodes: int = 0  # Ray worker nodes beside the head (`up --nodes N`), each its own raylet
    ray_node_cpus: int = 1  # logical CPUs each worker node offers
    ray_node_ports: list[dict[str, int]] = field(default_factory=list)  # per node; [] = pick
    bucket: str = "sagan"

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.ray_temp_dir is None:
            self.ray_temp_dir = short_temp_dir(self.state_dir, "ray")
        if self.ray_worker_ports is not None:
            self.ray_worker_ports = (int(self.ray_worker_ports[0]), int(self.ray_worker_ports[1]))

    @classmethod
    def with_free_ports(cls, state_dir: Path | str, **overrides: Any) -> StackConfig:
        """A config whose every port (Ray's auxiliary ports and a worker-port range included)
        is currently free."""
        ray_aux = (*RAY_AUX_PORT_FLAGS, *RAY_METRICS_PORT_ENV)
        ports = free_ports(4 + len(ray_aux))
        values: dict[str, Any] = {
            "s3_port": ports[0],
            "mlflow_port": ports[1],
            "ray_gcs_port": ports[2],
            "ray_dashboard_port": ports[3],
            "ray_aux_ports": dict(zip(ray_aux, ports[4:], strict=True)),
            "s3_aux_ports": s3_aux_free_ports(avoid=ports),
            "ray_worker_ports": free_port_range(100),
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
        nodes = [p for ports in self.ray_node_ports for k, p in ports.items()
                 if k not in NODE_WORKER_RANGE]
        return [self.s3_port, *self.s3_aux_ports.values(), self.mlflow_port, self.ray_gcs_port,
                self.ray_dashboard_port, *self.ray_aux_ports.values(), *nodes]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_dir"] = str(self.state_dir)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StackConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def config_path(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def load_config(state_dir: Path | str) -> StackConfig | None:
    """The config the stack in `state_dir` was last started with, if any."""
    path = config_path(Path(state_dir).expanduser().resolve())
    return StackConfig.from_json(json.loads(path.read_text())) if path.exists() else None


def save_config(cfg: StackConfig) -> None:
    config_path(cfg.state_dir).write_text(json.dumps(cfg.to_json(), indent=2))


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


def free_port(host: str = HOST) -> int:
    """A currently unused TCP port on `host` (there is a small race until a server binds it)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct free ports: all probe sockets are held open together so none repeats."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def s3_aux_free_ports(avoid: Iterable[int] = ()) -> dict[str, int]:
    """Free ports for every internal port of the S3 server (S3_AUX_PORT_FLAGS), none in
    `avoid` (ports chosen for other services but not bound yet)."""
    avoid = set(avoid)
    plain = [f for f in S3_AUX_PORT_FLAGS if not f.startswith("admin.")]
    ports = [p for p in free_ports(len(plain) + len(avoid)) if p not in avoid][:len(plain)]
    taken = avoid | set(ports)
    rng = random.Random()
    for _ in range(200):  # above Ray's worker range (20000-32000), + 10000 still a valid port
        admin = rng.randrange(33000, 65535 - WEED_GRPC_OFFSET)
        pair = (admin, admin + WEED_GRPC_OFFSET)
        if not taken & set(pair) and all(port_is_free(p) for p in pair):
            return {**dict(zip(plain, ports, strict=True)),
                    "admin.port": pair[0], "admin.port.grpc": pair[1]}
    raise StackError("no free pair of ports (p, p + 10000) for the S3 server's admin")


def ray_node_free_ports(nodes: int, avoid: Iterable[int] = ()) -> list[dict[str, int]]:
    """Per worker node: free ports for its raylet, object manager, agents and metrics (one
    host runs them all, so none may use Ray's fixed defaults) and its own worker-port range."""
    avoid = set(avoid)
    flags = [f for f in RAY_AUX_PORT_FLAGS if f not in HEAD_ONLY_PORT_FLAGS]
    ports = [p for p in free_ports(nodes * len(flags) + len(avoid)) if p not in avoid]
    out: list[dict[str, int]] = []
    for i in range(nodes):
        node = dict(zip(flags, ports[i * len(flags):(i + 1) * len(flags)], strict=True))
        lo, hi = free_port_range(50)
        while any(lo <= n[NODE_WORKER_RANGE[1]] and n[NODE_WORKER_RANGE[0]] <= hi for n in out):
            lo, hi = free_port_range(50)  # ranges of two nodes must not overlap
        out.append({**node, NODE_WORKER_RANGE[0]: lo, NODE_WORKER_RANGE[1]: hi})
    return out


def free_port_range(size: int, lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """A free contiguous range for Ray workers, below the kernel's ephemeral range (32768+) so
    outgoing connections do not take them, and away from Ray's default 10002-19999."""
    rng = random.Random()
    for _ in range(50):
        start = rng.randrange(lo, hi - size)
        if all(port_is_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise StackError(f"no free range of {size} ports in {lo}-{hi}")
