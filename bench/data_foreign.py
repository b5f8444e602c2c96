"""Foreign JPEG shards decoded and fitted in the loader vs our PNG shards of the same images.

    python -m bench.data_stream --mode foreign            # the entry point (this module's main)
    python -m bench.data_foreign --images 2000 --sizes 64 128

The same images (Noto emoji as 500x375 JPEG photos, bench/prepare_scaling.photo_jpeg) written
twice on local disk: as the ecosystem writes them (`webdataset.ShardWriter`, `jpg` + `cls`,
indexed) and as `prepare_data.py` would (PNG at the model's size). Each side streams through
`train_loader` with ONE loader worker process, so img/s is per loader core; rounds alternate
sides and the medians are compared (ratio foreign/ours). CPU seconds of the worker are recorded
too. Writes bench/results/data_foreign.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_foreign.json"))
    return ap.parse_args(argv)


def write_sides(tmp: Path, n: int, sizes: list[int]) -> dict[str, object]:
    """{'foreign': bound index per size, 'ours-<S>': manifest} over the same n images."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from bench.prepare_scaling import photo_jpeg
    from infra.local import emoji
    from sagan.data import build_index, transform_image, write_shards

    pkg = emoji.ensure_package()
    items = emoji.images(pkg)[:n]
    classes = sorted({c for _, c in items})
    jpegs = [photo_jpeg(pkg / "img/google/64" / name) for name, _ in items]
    labels = [classes.index(c) for _, c in items]
    (tmp / "foreign").mkdir()
    with wds.ShardWriter(str(tmp / "foreign" / "photos-%06d.tar"), maxcount=500,
                         verbose=0) as sink:
        for i, (data, label) in enumerate(zip(jpegs, labels, strict=True)):
            sink.write({"__key__": f"{i:06d}", "jpg": data, "cls": label})
    t0 = time.perf_counter()
    index = build_index(str(tmp / "foreign"))  # one process, one shard after another
    scan_s = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in (tmp / "foreign").glob("*.tar")) / 1e6
    print(f"index scan: {n} images, {mb:.1f} MB in {scan_s:.2f} s = {n / scan_s:.0f} img/s, "
          f"{mb / scan_s:.0f} MB/s on one core", flush=True)
    sides: dict[str, object] = {"index_scan": {"images": n, "mb": round(mb, 1),
                                               "seconds": round(scan_s, 2)}}
    for size in sizes:
        sides[f"foreign-{size}"] = index.bind(size, 3, "crop")
        decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs]
        sides[f"ours-{size}"] = write_shards(
            ((transform_image(a, size, 3, "crop"), lb) for a, lb in zip(decoded, labels,
                                                                         strict=True)),
            str(tmp / f"ours-{size}"), size, 3, len(classes), classes, "bench",
            samples_per_shard=500)
    return sides


def time_side(manifest, batch_size: int, batches: int) -> tuple[float, float, int]:
    """(wall s, loader-worker CPU s, images) with one loader worker process."""
    from bench.data_stream import _cpu_with_children
    from sagan.config import DataConfig
    from sagan.data import train_loader

    cfg = DataConfig(path="unused", loader_workers=1, shuffle_buffer=100, prefetch=0)
    c0 = _cpu_with_children()
    loader = train_loader(cfg, batch_size, batches_per_epoch=batches, manifest=manifest)
    it = iter(loader)
    next(it)  # worker start-up and the first shard are not the steady rate
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, _ in it)
    elapsed = time.perf_counter() - t0
    loader.close()
    return elapsed, _cpu_with_children() - c0, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.timing import write_json
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sagan-bench-foreign-") as tmp:
        sides = write_sides(Path(tmp), args.images, args.sizes)
        batches = max(3, args.images // args.batch_size)
        for size in args.sizes:
            rates: dict[str, list[float]] = {"foreign": [], "ours": []}
            cpu: dict[str, list[float]] = {"foreign": [], "ours": []}
            for _ in range(args.repeats):
                for side in ("foreign", "ours"):
                    elapsed, secs, n = time_side(sides[f"{side}-{size}"], args.batch_size,
                                                 batches)
                    rates[side].append(n / elapsed)
                    cpu[side].append(n / secs if secs > 0 else float("nan"))
                    print(f"  {size:4d}px {side:8s} {n / elapsed:8.0f} img/s per loader core",
                          flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            results[str(size)] = {
                "foreign_jpeg_img_per_s": round(med["foreign"], 1),
                "ours_png_img_per_s": round(med["ours"], 1),
                "ratio_foreign_over_ours": round(med["foreign"] / med["ours"], 3),
                "img_per_cpu_s": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
                "runs": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
            print(f"{size}px: foreign JPEG {med['foreign']:.0f} img/s, our PNG "
                  f"{med['ours']:.0f} img/s per loader core; ratio foreign/ours = "
                  f"{med['foreign'] / med['ours']:.2f}x", flush=True)
    report = {"benchmark": "data_foreign", "images": args.images, "source_size": "500x375",
              "index_scan": sides["index_scan"],
              "batch_size": args.batch_size, "repeats": args.repeats, "results": results,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_1m": round(os.getloadavg()[0], 2)}}
    print(f"wrote {write_json(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
