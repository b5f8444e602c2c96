"""Process ownership: start a service as its own process group, record it, stop exactly it.

Every service is started as the leader of a new session/process group and its pid (plus the
kernel's start time of that pid, so a recycled pid is never mistaken for ours) is written to
`<state>/pids/<service>.json`. Stopping signals those process groups and nothing else: never
`ray stop` (which kills every Ray process on the machine by name) and never `pkill`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.local.config import StackError

DEFAULT_STOP_GRACE_S = 5.0


def proc_stat(pid: int) -> tuple[str, int, int] | None:
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


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
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
        st = proc_stat(self.pid)
        if st is not None and st[0] == "Z":
            _reap(self.pid)
        return st is not None and st[2] == self.start_ticks and st[0] != "Z"

    def group_is_ours(self) -> bool:
        """Whether processes in group `pid` are still ours. Linux never hands out a pid that is
        still some process's pgid, so: if the leader is gone (or a zombie of ours), any member
        left in that group is ours; if `pid` now names a different process, our group is gone."""
        st = proc_stat(self.pid)
        return st is None or st[2] == self.start_ticks

    def members(self) -> list[int]:
        return group_members(self.pid) if self.group_is_ours() else []


def pid_path(state_dir: Path, service: str) -> Path:
    return state_dir / "pids" / f"{service}.json"


def _write_pid_record(state_dir: Path, service: str, pid: int, cmd: list[str],
                      log: Path) -> PidRecord:
    st = proc_stat(pid)
    if st is None:
        raise StackError(f"{service} exited immediately; see {log}")
    rec = PidRecord(service=service, pid=pid, start_ticks=st[2], cmd=cmd, log=str(log))
    path = pid_path(state_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(rec), indent=2))
    os.replace(tmp, path)
    return rec


def read_pid_records(state_dir: Path | str) -> dict[str, PidRecord]:
    """Every recorded service of the stack in `state_dir`, by name (none when nothing runs)."""
    folder = Path(state_dir) / "pids"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return {p.stem: PidRecord(**json.loads(p.read_text())) for p in paths}


def spawn(state_dir: Path, service: str, cmd: list[str], env: Mapping[str, str]) -> PidRecord:
    """Start `cmd` as the leader of a new session, logging to <state>/logs/<service>.log, and
    record it. The log header names the command, so nothing secret may be in `cmd`."""
    log = state_dir / "logs" / f"{service}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh, _sigterm_deferred():  # no process without its record
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=state_dir, start_new_session=True)
        return _write_pid_record(state_dir, service, proc.pid, cmd, log)


def stop_groups(recs: list[PidRecord], grace: Mapping[str, float] | None = None
                ) -> dict[str, list[int]]:
    """SIGTERM our process groups, SIGKILL each one still alive after its grace period
    (`grace[service]`, default DEFAULT_STOP_GRACE_S); return the leftovers per service. All
    groups are signalled together so stopping the stack costs one grace period, not three."""
    grace = grace or {}
    ours = [r for r in recs if r.group_is_ours()]
    t0 = time.monotonic()
    deadline = {r.service: t0 + grace.get(r.service, DEFAULT_STOP_GRACE_S) for r in ours}
    live = [r for r in ours if r.members()]
    _signal_groups(live, signal.SIGTERM)
    killed: set[str] = set()
    while live:
        now = time.monotonic()
        overdue = [r for r in live if now > deadline[r.service]]
        hopeless = {r.service for r in overdue if r.service in killed}  # SIGKILLed 5 s ago
        fresh = [r for r in overdue if r.service not in killed]
        _signal_groups(fresh, signal.SIGKILL)
        for rec in fresh:
            killed.add(rec.service)
            deadline[rec.service] = now + 5.0
        time.sleep(0.1)
        for rec in live:
            _reap(rec.pid)
        live = [r for r in live if r.service not in hopeless and r.members()]
    for rec in ours:
        _reap(rec.pid)
    return {r.service: r.members() for r in recs}


def _signal_groups(recs: list[PidRecord], sig: signal.Signals) -> None:
    for rec in recs:
        try:
            os.killpg(rec.pid, sig)
        except ProcessLookupError:
            pass


_deferred: list[int] | None = None  # signals held back while a service is being recorded


def _exit_143(signum: int, frame: object) -> None:
    if _deferred is not None:
        _deferred.append(signum)
        return
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Hold back `exit_on_sigterm`'s exit until the block is done (then raise it)."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield
    finally:
        pending, _deferred = _deferred, outer
    if pending:
        raise SystemExit(128 + pending[0])


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `timeout`, a CI runner giving up) end this process the way Ctrl-C
    does: as an exception, so `finally` blocks and context managers run and stop the servers
    it started. The default action ends the process on the spot and orphans them."""
    signal.signal(signal.SIGTERM, _exit_143)


_HELD_LOCKS: set[Path] = set()


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state dir: two `make quickstart`s started together must end
    with one stack (the second waits, then finds it healthy), not two racing for the ports.
    Re-entrant within a process, so the CLI can resolve its config under the lock and then
    call `up()`, which takes it again."""
    state_dir = state_dir.resolve()
    if state_dir in _HELD_LOCKS:
        yield
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _HELD_LOCKS.add(state_dir)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(state_dir)
            fcntl.flock(fh, fcntl.LOCK_UN)


def log_tail(path: str | Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])
