"""Turn a raw image dataset into WebDataset shards + manifest.json, locally or in S3.

    python pipelines/prepare_data.py fashion-mnist data/fashion-mnist-32
    python pipelines/prepare_data.py cifar10:~/Downloads/cifar-10-python.tar.gz s3://bucket/cifar10-32
    python pipelines/prepare_data.py imagefolder:~/photos data/photos-64 --image-size 64

A thin entry point: parsing and error reporting here, all work in ``sagan.data``
(``sources``, ``prepare``). With a Ray cluster (RAY_ADDRESS names one, or ``--ray``) the source
is split into ranges of shards, each encoded and uploaded by one Ray task; the manifest is
written last, by this process; the shards are the same bytes as without Ray. Bad input ends
with one line on stderr naming the file or field, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.preflight import absolute, source_absolute
from pipelines.ray_tasks import cluster_cpus, ray_map, use_ray
from sagan.data import FASHION_MNIST_DIR, FITS, DataError, prepare_dataset

SOURCES_HELP = f"""\
source specs (KIND[:PATH]):
  fashion-mnist            Fashion-MNIST idx files in {FASHION_MNIST_DIR} (offline default)
  fashion-mnist:DIR        the same files in another directory
  mnist:DIR                MNIST-format idx pair in DIR:
                           {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]
                           (or the {{images,labels}}.idx3-ubyte spelling)
  mnist:FILE               an idx images file (labels file found by name, optional)
  cifar10:PATH             CIFAR-10 python batches: cifar-10-python.tar.gz or its directory
  cifar100:PATH            CIFAR-100 python (fine labels): cifar-100-python.tar.gz or directory
  imagefolder:DIR          DIR/<class>/*.png|jpg|... (class = folder name), or flat DIR/*.png
                           (unconditional; also forced by --unconditional)
  npz:PATH                 arrays x (N,H,W) | (N,H,W,C) | (N,C,H,W), uint8 or float in [0,1];
                           optional y (N,) int, optional class_names

output: a local directory or s3://bucket/prefix (endpoint: --endpoint-url, else
AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; credentials from the usual AWS chain).
Writes <out>/train-%06d.tar and <out>/manifest.json (last). Re-running with the same output
replaces the shards and deletes stale ones: no duplicates.

examples:
  python pipelines/prepare_data.py fashion-mnist data/fashion-mnist-32
  python pipelines/prepare_data.py fashion-mnist s3://datasets/fmnist-32 --limit 10000
  python pipelines/prepare_data.py mnist:/data/mnist data/mnist-32-rgb --grey-to-rgb
  python pipelines/prepare_data.py cifar10:cifar-10-python.tar.gz data/cifar10-32
  python pipelines/prepare_data.py imagefolder:photos data/photos-64 --image-size 64 --fit crop
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Write WebDataset shards (PNG + class label) and manifest.json for training.",
        epilog=SOURCES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="KIND[:PATH], see below")
    ap.add_argument("out", help="output directory or s3://bucket/prefix")
    ap.add_argument("--image-size", type=int, default=32, help="square output size (default 32)")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=None,
                    help="output channels (default: the source's; 1 converts colour to grey)")
    ap.add_argument("--grey-to-rgb", action="store_true",
                    help="replicate greyscale into 3 channels")
    ap.add_argument("--fit", choices=FITS, default="resize",
                    help="resize: scale longer side, pad rest (default); crop: scale shorter "
                         "side, centre-crop; pad: never upscale, pad small images")
    ap.add_argument("--samples-per-shard", type=int, default=1000,
                    help="samples per tar shard (default 1000; want >= ranks x loader workers "
                         "shards in total)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    ap.add_argument("--limit", type=int, default=None,
                    help="keep only the first N samples after shuffling (a seeded subset)")
    ap.add_argument("--split", choices=("train", "test"), default="train",
                    help="which split of MNIST/CIFAR sources (default train)")
    ap.add_argument("--unconditional", action="store_true",
                    help="drop labels (write no cls members)")
    ap.add_argument("--endpoint-url", default=None,
                    help="S3 endpoint for S3-compatible stores (MinIO, Ceph, moto)")
    ray_group = ap.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="encode as Ray tasks (default when RAY_ADDRESS names a cluster; "
                                "the source path must be readable on every node)")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false",
                           help="encode in this process")
    ap.add_argument("--shards-per-task", type=int, default=None,
                    help="shards each Ray task writes (default: about four tasks per CPU of the "
                         "cluster; each task re-opens the source)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("image_size", "samples_per_shard", "shards_per_task"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return 2
    if args.limit is not None and args.limit <= 0:
        print("error: --limit must be > 0", file=sys.stderr)
        return 2
    map_fn, tasks = None, 1
    if use_ray(args.ray):  # tasks run in other directories: they get absolute paths
        args.source, _ = source_absolute(args.source, Path.cwd())
        args.out, _ = absolute(args.out, Path.cwd())
        map_fn = ray_map(f"writing {args.out}", unit="img", progress=not args.no_progress,
                         weight=lambda job: len(job[3]))
        tasks = 4 * cluster_cpus()
    try:
        m = prepare_dataset(
            args.source, args.out, image_size=args.image_size, channels=args.channels,
            grey_to_rgb=args.grey_to_rgb, limit=args.limit, seed=args.seed,
            samples_per_shard=args.samples_per_shard, endpoint_url=args.endpoint_url,
            split=args.split, fit=args.fit, unconditional=args.unconditional,
            progress=not args.no_progress, map_fn=map_fn,
            shards_per_task=args.shards_per_task, tasks=tasks)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no manifest was written, re-run to finish", file=sys.stderr)
        return 130
    kind = f"{m.num_classes} classes" if m.num_classes else "unconditional"
    print(f"wrote {m.total} samples in {len(m.shards)} shards ({m.image_size}px, "
          f"{m.channels} channel{'s' if m.channels > 1 else ''}, {kind}) to {m.location}")
    print(f"manifest: {m.url('manifest.json')}  content hash {m.content_hash()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
