"""Local S3 endpoint for development and tests: moto's S3 server on a free loopback port.

Why moto and not MinIO: moto is a pip dependency (no binary download, works offline), speaks
enough of the S3 API for our shards (PUT/GET/Range/List/Delete), and keeps everything in memory,
so a test gets a clean, isolated store in about a second. Why a real server rather than
`moto.mock_aws`: the data pipeline streams through real sockets (and through a fault-injecting
TCP proxy in the tests), which an in-process mock would bypass.

Library use (the infra scripts and the pytest fixture import this file):

    from infra.local.s3 import start_s3_server, stop_s3_server
    proc, endpoint = start_s3_server()      # e.g. http://127.0.0.1:40123
    ...
    stop_s3_server(proc)

CLI (foreground; Ctrl-C stops it):

    python infra/local/s3.py --port 9000
    # then: export AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=testing ...

This module imports nothing outside the standard library (and `infra.local.config`), so it can
be loaded before (or without) Ray, MLflow or the `sagan` package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from infra.local.config import free_port

__all__ = ["free_port", "local_s3", "server_command", "start_s3_server", "stop_s3_server",
           "wait_healthy"]


def server_command(host: str, port: int) -> list[str]:
    """Prefer the `moto_server` next to the running interpreter (the venv), then PATH, then
    `python -m moto.server`, so the helper works whether or not the venv is activated."""
    local = Path(sys.executable).with_name("moto_server")
    exe = str(local) if local.exists() else shutil.which("moto_server")
    if exe:
        return [exe, "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def wait_healthy(endpoint_url: str, proc: subprocess.Popen | None = None,
                 timeout: float = 30.0) -> None:
    """Block until `endpoint_url` answers HTTP (any status), or raise RuntimeError.

    Fails fast if `proc` exits meanwhile (e.g. the port was taken), instead of polling a dead
    server until the timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 server exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(endpoint_url + "/", timeout=2.0) as resp:
                resp.read()
            return
        except urllib.error.HTTPError:
            return  # it answered; an S3 error status still means the server is up
        except (OSError, urllib.error.URLError) as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"S3 server at {endpoint_url} not healthy after {timeout:.0f}s: {last}")


def start_s3_server(host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
                    log_path: str | os.PathLike | None = None,
                    attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 server and wait until it serves; return (process, endpoint_url).

    `port=None` picks a free port (retrying on a lost bind race). Server logs go to `log_path`
    or are discarded: werkzeug logs every request, and an unread pipe would eventually block
    the server.
    """
    last_error: Exception | None = None
    for _ in range(attempts if port is None else 1):
        chosen = port if port is not None else free_port(host)
        endpoint = f"http://{host}:{chosen}"
        log: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            log = open(log_path, "ab")  # handed to the child, closed below
        try:
            proc = subprocess.Popen(
                server_command(host, chosen),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # a Ctrl-C meant for the parent must not kill it early
            )
        finally:
            if log_path is not None:
                log.close()  # type: ignore[union-attr]
        try:
            wait_healthy(endpoint, proc, timeout)
            return proc, endpoint
        except RuntimeError as exc:
            last_error = exc
            stop_s3_server(proc)
    raise RuntimeError(f"could not start the moto S3 server: {last_error}")


def stop_s3_server(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop exactly this server process (SIGTERM, then SIGKILL after `timeout` seconds)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# AWS settings that would leak a real identity or endpoint into a local-S3 session.
_AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
              "AWS_REGION")


@contextlib.contextmanager
def local_s3(key_id: str = "testing") -> Iterator[str]:
    """A moto server for the duration of a `with` block, with this process's AWS_* environment
    pointed at it: dummy credentials (`key_id`), config/credential files disabled, profile,
    session token and other endpoints unset. Yields the endpoint URL; on exit the server is
    stopped and the environment restored exactly (a caller's real credentials are never used
    inside, and are back afterwards)."""
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": key_id,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    proc, endpoint = start_s3_server()
    saved = {k: os.environ.get(k) for k in [*env, *_AWS_UNSET, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env, AWS_ENDPOINT_URL_S3=endpoint)
    for k in _AWS_UNSET:
        os.environ.pop(k, None)
    try:
        yield endpoint
    finally:
        stop_s3_server(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until interrupted; print the env to point clients at."""
    ap = argparse.ArgumentParser(description="Run moto's S3 server on loopback for local dev.")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    ap.add_argument("--log", default=None, help="append server logs to this file")
    args = ap.parse_args(argv)
    proc, endpoint = start_s3_server(args.host, args.port, log_path=args.log)
    print(f"S3 (moto) serving at {endpoint}  pid {proc.pid}", flush=True)
    print(f"export AWS_ENDPOINT_URL_S3={endpoint} AWS_ACCESS_KEY_ID=testing "
          "AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1", flush=True)
    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop and proc.poll() is None:
            time.sleep(0.5)
    finally:
        stop_s3_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
