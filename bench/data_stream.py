"""Decoded images/s streamed from S3 (SeaweedFS on loopback) vs the same shards on local disk.

    python -m bench.data_stream                       # 20k Fashion-MNIST images, 32 px
    python -m bench.data_stream --limit 60000 --out /tmp/ds.json

Both sides run in the same process and the same run, alternating, on byte-identical shards
(written once locally, then uploaded), so the ratio isolates the storage path: request latency,
HTTP streaming through boto3 and the resumable reader, versus a buffered local file. Decoding,
batching and [-1, 1] scaling are identical. Reported per mode:

* ``eval``: the single deterministic pass (``eval_loader``), in-process with read-ahead threads.
* ``train``: ``train_loader`` with loader worker processes (``--workers``), fixed batch count.
* ``foreign`` (on its own): shards as the ecosystem writes them (JPEG, indexed, decoded and
  fitted in the loader) against our PNG shards of the same images: bench/data_foreign.py.

Median of ``--repeats`` alternating rounds; target ratio S3/local >= 0.9. Also reported: the
ratio of images per client CPU-second (this process plus its loader workers), which stays
meaningful when other jobs share the machine and make wall-clock rates swing. Note that the S3
server (the local stack's, infra/local/s3.py) runs on the same CPUs as the reader, so on a
2-core box it competes with decoding: a remote endpoint costs the client less CPU than this.
The server is stopped when the benchmark ends, is interrupted, or is killed (SIGTERM/timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from infra.local.processes import exit_on_sigterm
from infra.local.s3 import local_s3

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="fashion-mnist", help="prepare_dataset source spec")
    ap.add_argument("--limit", type=int, default=20000, help="images in the dataset")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds per side")
    ap.add_argument("--workers", type=int, default=2, help="loader workers in train mode")
    ap.add_argument("--mode", choices=("eval", "train", "both", "foreign"), default="both",
                    help="foreign: JPEG shards as others write them vs our PNG shards of the "
                         "same images, per loader core (bench/data_foreign.py)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_stream.json"))
    return ap.parse_args(argv)


def time_eval(path: str, batch_size: int) -> tuple[float, float, int]:
    """(wall s, this process's CPU s incl. read-ahead threads, images)."""
    from sagan.data import eval_loader

    loader = eval_loader(path, batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(int(x.shape[0]) for x, _ in loader)
    return time.perf_counter() - t0, time.process_time() - c0, n


def _cpu_with_children() -> float:
    """This process's CPU plus that of its exited, reaped children (the loader workers)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def time_train(path: str, batch_size: int, workers: int, batches: int
               ) -> tuple[float, float, int]:
    """(wall s, client CPU s incl. the loader worker processes, images)."""
    from sagan.config import DataConfig
    from sagan.data import train_loader

    cfg = DataConfig(path=path, loader_workers=workers, shuffle_buffer=1000)
    c0 = _cpu_with_children()
    loader = train_loader(cfg, batch_size, batches_per_epoch=batches)
    it = iter(loader)
    next(it)  # exclude worker start-up and the first shard's latency from the rate
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, _ in it)
    elapsed = time.perf_counter() - t0
    loader.close()  # joins the workers, so their CPU time is counted below
    return elapsed, _cpu_with_children() - c0, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "foreign":
        from bench.data_foreign import main as foreign

        return foreign([])
    exit_on_sigterm()  # `timeout`/kill: leave through `with local_s3()`, which stops the server
    import boto3

    from sagan.data import load_manifest, prepare_dataset

    with local_s3() as server, tempfile.TemporaryDirectory(prefix="sagan-bench-") as tmp:
        endpoint = server.endpoint
        t0 = time.perf_counter()
        m = prepare_dataset(args.source, tmp, image_size=args.image_size, limit=args.limit,
                            samples_per_shard=args.samples_per_shard)
        prep_s = time.perf_counter() - t0
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        for name in [s.name for s in m.shards] + ["manifest.json"]:
            client.upload_file(os.path.join(tmp, name), "bench", f"ds/{name}")
        s3_url = "s3://bench/ds"
        assert load_manifest(s3_url).content_hash() == m.content_hash()
        shard_mb = sum(os.path.getsize(os.path.join(tmp, s.name)) for s in m.shards) / 1e6
        print(f"dataset: {m.total} images, {len(m.shards)} shards, {shard_mb:.1f} MB "
              f"(prepared in {prep_s:.1f}s); S3 at {endpoint}", flush=True)

        sides = {"local": tmp, "s3": s3_url}
        modes = ["eval", "train"] if args.mode == "both" else [args.mode]
        batches = max(2, m.total // args.batch_size)
        results: dict[str, dict] = {}
        time_eval(tmp, args.batch_size)  # warm-up: imports, page cache, first client
        time_eval(s3_url, args.batch_size)
        for mode in modes:
            rates: dict[str, list[float]] = {"local": [], "s3": []}
            cpu_rates: dict[str, list[float]] = {"local": [], "s3": []}
            for _ in range(args.repeats):
                for side, path in sides.items():
                    if mode == "eval":
                        elapsed, cpu, n = time_eval(path, args.batch_size)
                    else:
                        elapsed, cpu, n = time_train(path, args.batch_size, args.workers,
                                                     batches)
                    rates[side].append(n / elapsed)
                    cpu_rates[side].append(n / cpu)
                    print(f"  {mode:5s} {side:5s} {n / elapsed:10.0f} img/s "
                          f"({n} in {elapsed:.2f}s wall, {cpu:.2f}s client CPU)", flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            ratio = med["s3"] / med["local"]
            results[mode] = {"local_img_per_s": round(med["local"], 1),
                             "s3_img_per_s": round(med["s3"], 1),
                             "ratio_s3_over_local": round(ratio, 3),
                             "runs": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
            line = (f"{mode}: local {med['local']:.0f} img/s, S3 {med['s3']:.0f} img/s, "
                    f"ratio S3/local = {ratio:.2f}x (target >= 0.9)")
            # CPU-normalised (client side): robust to other load on a shared box.
            cmed = {k: statistics.median(v) for k, v in cpu_rates.items()}
            results[mode]["cpu_ratio_s3_over_local"] = round(cmed["s3"] / cmed["local"], 3)
            line += f"; per client CPU-second {cmed['s3'] / cmed['local']:.2f}x"
            print(line, flush=True)

    report = {
        "benchmark": "data_stream",
        "dataset": {"source": args.source, "images": m.total, "shards": len(m.shards),
                    "image_size": args.image_size, "mb": round(shard_mb, 2)},
        "batch_size": args.batch_size, "repeats": args.repeats, "workers": args.workers,
        "results": results,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
