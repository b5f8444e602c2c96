"""The Ray services of the local stack: the head (`ray start --head`) and the worker nodes of
`up --nodes N` (`ray start --address`), each its own process group with private ports and temp
dir. Auth headers, the GCS address and the other services are in `infra/local/services.py`."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
from pathlib import Path

from infra.local.config import (
    HOST,
    NODE_WORKER_RANGE,
    RAY_METRICS_PORT_ENV,
    StackConfig,
    StackError,
)
from infra.local.services import (
    Service,
    gcs_address,
    http_get,
    ray_auth_headers,
    ray_token_path,
    tool,
)


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

    def scratch_dirs(self, cfg: StackConfig) -> list[Path]:
        return [Path(str(cfg.ray_temp_dir))]

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
            if flag not in RAY_METRICS_PORT_ENV:
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
        metrics = {k: str(p) for k, p in cfg.ray_aux_ports.items() if k in RAY_METRICS_PORT_ENV}
        return {"RAY_AUTH_MODE": "token", **metrics}

    def before_start(self, cfg: StackConfig) -> None:
        """Make sure a Ray auth token exists before starting Ray in token mode.

        Why token mode always: Ray's GCS/raylet gRPC servers listen on every interface whatever
        --dashboard-host says, and with RAY_AUTH_MODE unset `ray start` silently turns token
        auth on or off depending on whether ~/.ray/auth_token happens to exist. Fixing the mode
        makes the stack behave the same on every machine and keeps other hosts from submitting
        work. The token lives where Ray keeps it (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]);
        it is never printed.
        """
        # written by `ray start` once its node is up: stale, it would pass the check below
        (Path(str(cfg.ray_temp_dir)) / "ray_current_cluster").unlink(missing_ok=True)
        if os.environ.get("RAY_AUTH_TOKEN"):
            return
        path = ray_token_path()
        if path.is_file() and path.read_text().strip():
            return
        res = subprocess.run([tool("ray"), "get-auth-token", "--generate"], capture_output=True,
                             text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if res.returncode != 0:
            raise StackError(f"could not create a Ray auth token: {res.stderr.strip()[-500:]}")

    def check(self, cfg: StackConfig) -> str | None:
        """None when `ray start` has finished (it writes the GCS address last: the dashboard
        answers earlier, and worker nodes need that address) and the dashboard answers
        /api/version and the job API lists jobs."""
        if not (Path(str(cfg.ray_temp_dir)) / "ray_current_cluster").is_file():
            return "`ray start` has not finished (no GCS address written yet)"
        headers = ray_auth_headers()
        try:
            version = json.loads(http_get(cfg.ray_address + "/api/version", headers))
            json.loads(http_get(cfg.ray_address + "/api/jobs/", headers))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            return f"dashboard/job API not answering: {exc}"
        return None if "ray_version" in version else f"unexpected /api/version: {version}"


class RayNode(Service):
    """Worker node `index` (1-based): `ray start --address=<head GCS> --block`, its own raylet,
    object store, agents and workers in one process group, so stopping (or killing) the group
    is what losing a machine looks like to Ray. Ports are its own (`ray_node_ports`): several
    nodes share one host."""

    wave = 2  # after the head is healthy

    def __init__(self, index: int):
        self.index = index
        self.name = f"ray-node-{index}"

    def _ports(self, cfg: StackConfig) -> dict[str, int]:
        return cfg.ray_node_ports[self.index - 1]

    def ports(self, cfg: StackConfig) -> list[int]:
        return [p for k, p in self._ports(cfg).items() if k not in NODE_WORKER_RANGE]

    def address(self, cfg: StackConfig) -> str:
        return f"raylet on port {self._ports(cfg)['node-manager-port']}"

    def command(self, cfg: StackConfig) -> list[str]:
        cmd = [tool("ray"), "start", "--address", gcs_address(cfg), "--block",
               "--disable-usage-stats", "--num-cpus", str(cfg.ray_node_cpus),
               "--object-store-memory", str(cfg.ray_object_store_mb * 1024 * 1024)]
        for flag, port in self._ports(cfg).items():
            cmd += [f"--{flag}", str(port)]
        return cmd + ["--temp-dir", str(self.scratch_dirs(cfg)[0])]

    def scratch_dirs(self, cfg: StackConfig) -> list[Path]:
        """Its own temp dir (sockets, logs): in the head's, Ray numbers the sockets of nodes
        (raylet.1, raylet.2, ...) and two nodes starting together race for one name."""
        return [Path(f"{cfg.ray_temp_dir}_n{self.index}")]

    def starting(self, cfg: StackConfig) -> str:
        return (f"starting Ray worker node {self.index} ({cfg.ray_node_cpus} CPU, "
                f"{self.address(cfg)}), joining {gcs_address(cfg)} ...")

    def extra_env(self, cfg: StackConfig) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token"}  # the head runs with token auth (RayHead)

    def check(self, cfg: StackConfig) -> str | None:
        """None when the head's GCS lists this node (by its raylet port) as alive."""
        port = self._ports(cfg)["node-manager-port"]
        try:
            nodes = json.loads(http_get(cfg.ray_address + "/nodes?view=summary",
                                         ray_auth_headers()))["data"]["summary"]
        except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
            return f"cannot list the cluster's nodes: {exc}"
        # a node that was lost and restarted on the same port is listed twice: dead and alive
        states = {n.get("raylet", {}).get("state") for n in nodes
                  if n.get("raylet", {}).get("nodeManagerPort") == port}
        if "ALIVE" in states:
            return None
        return f"node state {sorted(states)}" if states else "not registered with the head yet"
