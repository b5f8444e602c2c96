"""Images/s and latency of the Ray Serve app (pipelines/serve.py) for 1 and N concurrent clients.

    python -m bench.serve --url http://127.0.0.1:8000            # an app already running
    python -m bench.serve --model models:/NAME@champion --tracking-uri URI   # starts one

Each client sends `GET /sample?class_id=..&seed=..` back to back (a new seed every request, so
nothing is cached) on loopback only; a level stops after --requests requests per client or
--seconds, whichever comes first. Reported per level: images/s, p50/p99 latency, and the
versions that answered. The baseline is the 1-client level of the same run, measured again
after the others (ABA), so the printed ratio (N clients vs 1) compares numbers taken minutes
apart on the same machine, not against another day's. With --model, the app is started in an
embedded Ray (pipelines/serve.py) on a free port and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def level(url: str, clients: int, requests: int, seconds: float, num_classes: int,
          seed0: int) -> dict[str, Any]:
    """`clients` threads, each sending up to `requests` GET /sample within `seconds`."""
    lat: list[float] = []
    versions: set[str] = set()
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        for i in range(requests):
            if time.monotonic() > stop_at:
                return
            seed = seed0 + k * requests + i
            q = {"seed": seed, **({"class_id": seed % num_classes} if num_classes else {})}
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{url}/sample?{urllib.parse.urlencode(q)}",
                                            timeout=60) as r:
                    r.read()
                    v = r.headers.get("X-Model-Version", "")
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                lat.append(time.perf_counter() - t)
                versions.add(v)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "images": len(lat), "errors": len(errors), "wall_s": wall,
            "images_per_s": len(lat) / wall if wall else 0.0,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "versions": sorted(versions), "first_error": errors[0] if errors else None}


def _start_app(model: str, tracking_uri: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    from infra.local.config import free_ports

    (port,) = free_ports(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)  # an embedded Ray of its own
    proc = subprocess.Popen([sys.executable, "pipelines/serve.py", "--model", model,
                             "--tracking-uri", tracking_uri, "--port", str(port), *extra],
                            cwd=ROOT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench.serve: error: the app exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench.serve: error: {url} not answering after {timeout} s") \
                    from None
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running app (loopback only)")
    p.add_argument("--model", help="start pipelines/serve.py with this model instead")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    p.add_argument("--app-arg", action="append", default=[], metavar="ARG",
                   help="extra pipelines/serve.py argument, e.g. --app-arg=--max-batch-size=8")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--requests", type=int, default=200, help="per client and level (default 200)")
    p.add_argument("--seconds", type=float, default=30, help="per level (default 30)")
    p.add_argument("--warmup", type=int, default=10, help="requests before measuring")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.model):
        p.error("give exactly one of --url or --model")
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0:
        p.error("--clients, --requests and --seconds must be > 0")
    proc = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url {args.url}: loopback only (127.0.0.1)")
        url = args.url.rstrip("/")
    else:
        proc, url = _start_app(args.model, args.tracking_uri, args.app_arg)
    try:
        info = _wait_up(url, proc)
        n = int(info.get("num_classes", 0))
        level(url, 1, args.warmup, args.seconds, n, 10**6)
        before = info.get("batches", {})
        runs = [level(url, 1, args.requests, args.seconds, n, 0)]
        mid = _wait_up(url, proc).get("batches", {})
        runs.append(level(url, args.clients, args.requests, args.seconds, n, 10**5))
        after = _wait_up(url, proc).get("batches", {})
        runs.append(level(url, 1, args.requests, args.seconds, n, 2 * 10**5))
        # the replica's @serve.batch counters (one replica: all requests; several: one of them)
        for r, (a, b) in zip(runs[:2], ((before, mid), (mid, after)), strict=True):
            if a and b and b["count"] > a["count"]:
                r["mean_batch"] = (b["requests"] - a["requests"]) / (b["count"] - a["count"])
    finally:
        if proc is not None:  # the app deletes itself and its embedded Ray; else the group
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    base = statistics.mean(r["images_per_s"] for r in (runs[0], runs[2]))
    ratio = runs[1]["images_per_s"] / base if base else float("nan")
    payload = {"url": url, "model": info, "levels": runs, "ratio_n_vs_1": ratio,
               "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "loadavg_1m": os.getloadavg()[0], "args": vars(args)}
    for r in runs:
        print(f"{r['clients']} client(s): {r['images_per_s']:.1f} images/s, p50 {r['p50_ms']:.1f} "
              f"ms, p99 {r['p99_ms']:.1f} ms ({r['images']} images, {r['errors']} errors, "
              f"versions {r['versions']}"
              + (f", mean batch {r['mean_batch']:.1f})" if "mean_batch" in r else ")"))
    print(f"{args.clients} clients vs 1 (mean of the 1-client runs before and after): "
          f"{ratio:.2f}x images/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
