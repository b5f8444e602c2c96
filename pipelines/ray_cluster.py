"""The Ray cluster a driver works on, and where that cluster keeps a run's checkpoints.

Which cluster (`connect`):
- `RAY_ADDRESS` holds a cluster address (`ray job submit` sets it for the job's driver; the local
  stack's env file sets it): join that cluster.
- otherwise (unset, or an `http://` job-server address, which is meant for `ray job submit`
  and not for a driver): the *embedded default*. Start a private single-node Ray for this
  process with `ray.init(address="local")`, never attaching to another Ray instance on the
  machine, and point every process of it at its own GCS: `RAY_ADDRESS` is set before the start,
  so the raylet and every worker it spawns inherit it (Ray Train's detached placement-group
  cleaner otherwise looks the cluster up by scanning for GCS processes, and finds several).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from sagan.data import resolve_endpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CONNECTED = ""  # what connect() joined, for the progress lines of later calls


def connect(runtime_env: dict | None = None) -> str:
    """Connect this process to its Ray cluster (see the module docstring); returns a short
    description of which one for the progress line. `runtime_env`: the job's default (e.g. a
    working_dir the serving replicas import from)."""
    import ray

    global _CONNECTED
    if ray.is_initialized():
        return _CONNECTED or "the Ray cluster this process is already connected to"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and not address.startswith(("http://", "https://")):
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        _CONNECTED = f"the Ray cluster at {address}"
        return _CONNECTED
    if address:
        print(f"RAY_ADDRESS={address} is a job-server address (for `ray job submit`), not a "
              "cluster to join: starting an embedded Ray instead", flush=True)
    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # Ray reads it when it starts the GCS
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # another cluster's job server
    ray.init(address="local", _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env=runtime_env)
    _CONNECTED = f"an embedded local Ray (127.0.0.1:{port})"
    return _CONNECTED


def alive_nodes() -> int:
    """Nodes of the connected cluster that are up now."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def storage_location(path: str) -> tuple[str, object | None]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig. An s3:// path on a
    custom endpoint (MinIO, moto: the same endpoint `sagan.data` reads from) needs an explicit
    pyarrow S3FileSystem; a local path must already be absolute (`preflight.localize_paths`)."""
    if not path.startswith("s3://"):
        return str(Path(path)), None
    endpoint = resolve_endpoint(None)
    if not endpoint:
        return path, None
    from pyarrow import fs

    scheme = "https" if endpoint.startswith("https") else "http"
    host = endpoint.split("://", 1)[1].rstrip("/")
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return path[len("s3://"):], fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                                region=region)


def wait_for_storage(storage_path: str, timeout_s: float, what: str, say) -> float:
    """Before a checkpoint upload to `s3://` storage on a custom endpoint: wait until the
    endpoint answers HTTP at all, at most `timeout_s`, with one line a minute; returns the
    seconds waited. Why: the upload (pyarrow, inside Ray Train) fails or, worse, loses parts
    silently when the server is down (docs/RELIABILITY.md), and a failed report is a worker
    failure that redoes the steps since the previous checkpoint. Waiting pauses training at
    the checkpoint instead; the previous checkpoint stays as it was. After `timeout_s` the
    upload is tried anyway and fails as before (Ray Train retries from the previous one)."""
    import time
    import urllib.error
    import urllib.request

    endpoint = resolve_endpoint(None) if storage_path.startswith("s3://") else None
    if not endpoint:
        return 0.0

    def answers() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()  # noqa: S310 - user's endpoint
        except urllib.error.HTTPError:  # 403 and the like: the server is there
            return True
        except (OSError, ValueError):
            return False
        return True

    start, noted = time.monotonic(), -1
    since = time.strftime("%H:%M:%S UTC", time.gmtime())
    while not answers():
        waited = time.monotonic() - start
        if waited >= timeout_s:
            break
        if int(waited // 60) > noted:
            noted = int(waited // 60)
            say(f"checkpoint storage {endpoint} unreachable (down since {since}); waiting to "
                f"upload {what} (up to cluster.storage_wait_s={timeout_s:.0f} s)")
        time.sleep(2.0)
    return time.monotonic() - start


def placeable_workers(cpus: float, gpus: float, placement: str) -> tuple[int, int]:
    """(how many workers of (cpus, gpus) the alive nodes can hold, how many nodes are alive),
    from each node's total resources; `strict_spread` puts at most one worker on a node."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = 0
    for node in alive:
        res = node.get("Resources", {})
        fits = [res.get(name, 0.0) // need for name, need in (("CPU", cpus), ("GPU", gpus))
                if need > 0]
        n = int(min(fits)) if fits else 1
        total += min(n, 1) if placement == "strict_spread" else n
    return total, len(alive)


class CapacityWatch:
    """While a run trains, say once per change when the cluster cannot hold
    `cluster.workers`' minimum (a node was lost and no spare one is there): Ray Train then
    waits for capacity without a word on the driver. Polls the GCS every `period` seconds."""

    def __init__(self, cluster, period: float = 2.0):
        import threading

        self.c, self.period = cluster, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-watch", daemon=True)

    def __enter__(self) -> CapacityWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period + 1)

    def _run(self) -> None:
        c, short = self.c, False
        while not self._stop.wait(self.period):
            try:
                n, nodes = placeable_workers(c.cpus_per_worker, c.gpus_per_worker, c.placement)
            except Exception:  # noqa: BLE001 - the GCS is busy or restarting: ask again later
                continue
            if n < c.min_workers and not short:
                print(f"waiting for capacity: cluster.workers={c.workers} needs {c.min_workers} "
                      f"worker(s) of CPU {c.cpus_per_worker:g}, GPU {c.gpus_per_worker:g} "
                      f"(placement {c.placement}) but the {nodes} alive node(s) hold {n}; "
                      "training continues from the last checkpoint when a node joins",
                      flush=True)
            elif n >= c.min_workers and short:
                print(f"capacity back: the {nodes} alive node(s) hold {n} worker(s)", flush=True)
            short = n < c.min_workers
