"""Bring the local stack up, down, or report on it (library API; the CLI is `__main__`).

    from infra.local.config import StackConfig
    from infra.local.stack import up, down, status
    cfg = StackConfig.with_free_ports(state_dir)     # isolated ports for tests
    info = up(cfg)                                   # -> StackInfo (addresses, env file)
    down(cfg.state_dir, purge=True)

`up` is idempotent: services already running and healthy are left alone (same pids), dead
ones are restarted on the same ports, and whatever a failed `up` started is stopped again.
`down` stops exactly the recorded process groups (`infra.local.processes`).

Everything a stack holds lives in its state dir (S3 objects, MLflow database, logs) and
survives `down`; `down --purge` deletes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.local.config import (
    HOST,
    StackConfig,
    StackError,
    config_path,
    load_config,
    port_is_free,
    ray_node_free_ports,
    resolve_state_dir,
    s3_aux_free_ports,
    save_config,
)
from infra.local.processes import (
    PidRecord,
    log_tail,
    pid_path,
    read_pid_records,
    spawn,
    state_lock,
    stop_groups,
)
from infra.local.s3 import CONFLICTING_AWS_ENV
from infra.local.services import (
    Service,
    gcs_address,
    ray_auth_headers,
    service_env,
    services_for,
    stack_env,
)


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
        """`base` (default os.environ) plus the stack's variables, for subprocess(env=...);
        without AWS settings that would mix another identity into the stack's S3 keys."""
        merged = {k: v for k, v in (os.environ if base is None else base).items()
                  if k not in CONFLICTING_AWS_ENV}
        merged.update(self.env)
        return merged


# --------------------------------------------------------------------------------------------
# env file
# --------------------------------------------------------------------------------------------
def write_env_file(cfg: StackConfig) -> Path:
    """Write `<state>/env` as `export K=V` lines (shell-quoted) so `source` works in bash/zsh.
    It holds the S3 keys: readable by the owner only, from the moment it exists."""
    lines = ["# Written by `python -m infra.local up`; `source` it. Removed by `down`.",
             f"unset {' '.join(CONFLICTING_AWS_ENV)}  # another AWS identity breaks the S3 keys"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in stack_env(cfg).items()]
    tmp = cfg.env_file.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write("\n".join(lines) + "\n")
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


def _info(cfg: StackConfig) -> StackInfo:
    recs = read_pid_records(cfg.state_dir)
    return StackInfo(
        state_dir=cfg.state_dir, ray_address=cfg.ray_address, ray_gcs_address=gcs_address(cfg),
        ray_dashboard_url=cfg.ray_address, mlflow_uri=cfg.mlflow_uri,
        s3_endpoint=cfg.s3_endpoint, bucket=cfg.bucket, env_file=cfg.env_file,
        env=read_env_file(cfg.env_file) if cfg.env_file.exists() else stack_env(cfg),
        pids={name: rec.pid for name, rec in recs.items()}, config=cfg)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _tag(svc: Service | str) -> str:
    return f"[{getattr(svc, 'name', svc):6}]"


# --------------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------------
def up(cfg: StackConfig | None = None, *, timeout: float = 180.0, quiet: bool = False) -> StackInfo:
    """Bring every service to 'healthy' and write the env file; idempotent.

    On failure (or Ctrl-C), whatever this call started is stopped again, so a failed `up` (or a
    failed test fixture) leaves no stray processes behind.
    """
    cfg = cfg or load_config(resolve_state_dir(None)) or StackConfig()
    with state_lock(cfg.state_dir):
        return _up_locked(cfg, timeout, quiet)


def _recorded_by_moto_stack(state: Path) -> bool:
    """Whether `state` was last started by the moto-based stack (S3 in memory), whose
    stack.json predates the S3 server's own ports."""
    path = config_path(state)
    return path.exists() and "s3_aux_ports" not in json.loads(path.read_text())


def _up_locked(cfg: StackConfig, timeout: float, quiet: bool) -> StackInfo:
    if _recorded_by_moto_stack(cfg.state_dir):
        raise StackError(f"{cfg.state_dir} is from the older stack whose S3 (moto) kept data in "
                         "memory: its shards and MLflow artifacts are gone. Run `infra/local/"
                         f"down --purge --state-dir {cfg.state_dir}` (deletes it), then `up`.")
    recs = read_pid_records(cfg.state_dir)
    previous = load_config(cfg.state_dir)
    if not cfg.s3_aux_ports:  # the S3 server's internal ports: as recorded, else free ones
        kept = previous.s3_aux_ports if previous is not None else {}
        cfg = dataclasses.replace(cfg, s3_aux_ports=kept or s3_aux_free_ports(cfg.all_ports()))
    if previous is not None and any(r.leader_alive() for r in recs.values()):
        if previous.to_json() != cfg.to_json():
            raise StackError(f"a stack with a different configuration is running from "
                             f"{cfg.state_dir}; run `down` first (or omit the port options "
                             "to reuse the running one)")
    if len(cfg.ray_node_ports) != cfg.ray_nodes:  # worker nodes' ports: recorded, else free
        kept = previous.ray_node_ports if previous is not None else []
        cfg = dataclasses.replace(cfg, ray_node_ports=kept[:cfg.ray_nodes] + ray_node_free_ports(
            max(0, cfg.ray_nodes - len(kept)), cfg.all_ports()))
    save_config(cfg)

    services = services_for(cfg)
    todo: list[Service] = []
    t0 = time.monotonic()
    try:
        todo = [svc for svc in services if not _keep_running(cfg, svc, recs.get(svc.name), quiet)]
        for svc in todo:
            taken = [p for p in svc.ports(cfg) if not port_is_free(p)]
            if taken:
                raise StackError(f"{svc.name}: port(s) {taken} on {HOST} are in use by another "
                                 "process. Stop it, pick other ports (see --help), or use "
                                 "`up --free-ports`.")
        deadline = time.monotonic() + timeout
        for wave in sorted({svc.wave for svc in services}):
            pending: dict[str, tuple[Service, PidRecord]] = {}
            for svc in (s for s in todo if s.wave == wave):
                svc.before_start(cfg)
                _say(f"{_tag(svc)} {svc.starting(cfg)}", quiet)
                rec = spawn(cfg.state_dir, svc.name, svc.command(cfg), service_env(cfg, svc))
                pending[svc.name] = (svc, rec)
            _wait_healthy(cfg, pending, deadline, timeout, t0, quiet)
        write_env_file(cfg)
    except BaseException:
        # Stop what this call started, found in the pid records `spawn` writes before it
        # returns (a SIGTERM arriving in between is deferred), then forget them.
        names = {svc.name for svc in todo}
        started = [r for n, r in read_pid_records(cfg.state_dir).items() if n in names]
        _stop(cfg, started)
        for rec in started:
            pid_path(cfg.state_dir, rec.service).unlink(missing_ok=True)
        raise

    info = _info(cfg)
    _say(_summary(info), quiet)
    return info


def _keep_running(cfg: StackConfig, svc: Service, rec: PidRecord | None, quiet: bool) -> bool:
    """True for a service that runs and is healthy. One that is alive but unhealthy (a wedged
    server) is stopped; leftovers of a crashed leader are stopped; both are then restarted."""
    if rec is None:
        return False
    if rec.leader_alive():
        svc.settle(cfg)
        problem = svc.check(cfg)
        if problem is None:
            _say(f"{_tag(svc)} already running (pid {rec.pid})", quiet)
            return True
        _say(f"{_tag(svc)} running but unhealthy ({problem}); restarting", quiet)
        _stop(cfg, [rec])
    elif _stop(cfg, [rec])[svc.name]:
        raise StackError(f"could not stop leftovers of {svc.name}: {rec.members()}")
    return False


def _stop(cfg: StackConfig, recs: list[PidRecord]) -> dict[str, list[int]]:
    """Stop these recorded services (each with its own grace period) and let each service
    clean up after its process; return what is left running, per service."""
    services = {svc.name: svc for svc in services_for(cfg)}
    leftovers = stop_groups(recs, {n: svc.stop_grace_s for n, svc in services.items()})
    for name, left in leftovers.items():
        if not left and name in services:
            services[name].after_stop(cfg)
    return leftovers


def _wait_healthy(cfg: StackConfig, pending: dict[str, tuple[Service, PidRecord]],
                  deadline: float, timeout: float, t0: float, quiet: bool) -> None:
    """Poll the health checks of the services just started until all pass."""
    last: dict[str, str | None] = {}
    while pending:
        for name, (svc, rec) in list(pending.items()):
            if not rec.leader_alive():
                raise StackError(f"{name} exited during startup; last log lines "
                                 f"({rec.log}):\n{log_tail(rec.log)}")
            svc.settle(cfg)
            last[name] = svc.check(cfg)
            if last[name] is None:
                _say(f"{_tag(svc)} healthy ({time.monotonic() - t0:.1f}s)", quiet)
                del pending[name]
        if pending and time.monotonic() > deadline:
            details = "; ".join(f"{s}: {last.get(s)}" for s in pending)
            logs = "\n".join(f"  {s} log {r.log}:\n{log_tail(r.log)}"
                             for s, (_, r) in pending.items())
            raise StackError(f"not healthy after {timeout:.0f}s: {details}\n{logs}")
        if pending:
            time.sleep(0.5)


def _summary(info: StackInfo) -> str:
    return "\n".join([
        "",
        "Local stack is up:",
        f"  Ray jobs / dashboard  {info.ray_address}   (GCS {info.ray_gcs_address})",
        f"  MLflow UI / API       {info.mlflow_uri}",
        f"  S3 (SeaweedFS)        {info.s3_endpoint}   bucket s3://{info.bucket}",
        f"  env file              {info.env_file}",
        "",
        f"  source {shlex.quote(str(info.env_file))}",
        "  ray job submit --working-dir . -- python pipelines/train.py",
    ])


# --------------------------------------------------------------------------------------------
# down / status
# --------------------------------------------------------------------------------------------
def down(state_dir: Path | str | None = None, *, purge: bool = False,
         quiet: bool = False) -> dict[str, list[int]]:
    """Stop exactly the process groups recorded in `state_dir`; return leftovers per service
    (empty lists when everything is gone). Data stays; `purge` also deletes the state dir (S3
    objects, MLflow database, logs) and the services' scratch dirs (Ray's temp dir, S3's
    sockets). Safe to call when nothing runs."""
    state = resolve_state_dir(state_dir)
    if not state.is_dir():
        _say("Local stack is down (no state dir).", quiet)
        return {}
    with state_lock(state):
        leftovers = _down_locked(state, quiet)
    if purge and not any(leftovers.values()):
        cfg = load_config(state) or StackConfig(state)
        for svc in services_for(cfg):
            for scratch in svc.scratch_dirs(cfg):
                shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    _say("Local stack is down." if not any(leftovers.values()) else
         "Local stack is down, with leftovers (see above).", quiet)
    return leftovers


def _down_locked(state: Path, quiet: bool) -> dict[str, list[int]]:
    cfg = load_config(state)
    recs = read_pid_records(state)
    for service, rec in recs.items():
        if rec.leader_alive() or rec.members():
            _say(f"{_tag(service)} stopping process group {rec.pid} ...", quiet)
    leftovers = _stop(cfg or StackConfig(state), list(recs.values()))
    for service, left in leftovers.items():
        if left:
            _say(f"{_tag(service)} WARNING: still running after SIGKILL: {left}", quiet)
        else:
            pid_path(state, service).unlink(missing_ok=True)
    if cfg is not None:
        cfg.env_file.unlink(missing_ok=True)  # stale addresses would mislead clients
        busy = [p for p in cfg.all_ports() if not port_is_free(p)]
        if busy and not any(leftovers.values()):
            _say(f"note: port(s) {busy} are in use, but not by this stack's processes", quiet)
    return leftovers


def status(state_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """Per service: running (leader alive), healthy (health check passed), pid, detail."""
    state = resolve_state_dir(state_dir)
    cfg = load_config(state)
    recs = read_pid_records(state)
    out: dict[str, dict[str, Any]] = {}
    for svc in services_for(cfg or StackConfig(state)):
        rec = recs.get(svc.name)
        running = rec is not None and rec.leader_alive()
        problem = svc.check(cfg) if (running and cfg is not None) else "not running"
        out[svc.name] = {"running": running, "healthy": problem is None,
                         "pid": rec.pid if rec else None,
                         "address": svc.address(cfg) if cfg is not None else None,
                         "detail": problem}
    return out
