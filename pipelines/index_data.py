"""Index WebDataset shards as others write them, so they train as they are (no re-encoding).

    python pipelines/index_data.py 's3://b/ds/train-{000000..001023}.tar'
    python pipelines/index_data.py s3://b/ds/ --out s3://b/idx/ds --label json:label
    python pipelines/index_data.py /data/shards/ --image-key webp --label none

Scans each shard as one Ray task (on the cluster RAY_ADDRESS names, or an embedded local Ray;
`--no-ray` scans here, one after another) and writes `manifest.json` (an index: per-shard
sample counts and sha256, class ids and counts, image sizes, which keys exist, bad shards) to
`--out`, by default beside the shards (`<dir>/.sagan-index/<pattern>-<hash>/`). Training on the
same `data.path` finds it there, or at `data.index` when `--out` was given. Bad input ends with
one `error:` line naming the shard or field, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from sagan.data import IMAGE_KEYS, DataError, build_index


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="index_data.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", help="brace list (quote it), prefix/directory of .tar files, or "
                                   "one .tar; local, s3:// or http(s):// (brace list only)")
    ap.add_argument("--out", default=None,
                    help="where the index goes (default: beside the shards); for read-only "
                         "buckets, then train with data.index=OUT")
    ap.add_argument("--image-key", default=None,
                    help=f"member holding the image (default: first of {', '.join(IMAGE_KEYS)})")
    ap.add_argument("--label", default="cls",
                    help="member holding the class: cls (default), json:FIELD, or none")
    ap.add_argument("--endpoint-url", default=None, help="S3 endpoint (S3-compatible stores)")
    ray_group = ap.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="ray", action="store_true", default=None,
                           help="scan as Ray tasks (default when RAY_ADDRESS names a cluster)")
    ray_group.add_argument("--no-ray", dest="ray", action="store_false",
                           help="scan in this process, one shard after another")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def index_shards(spec: str, out: str | None, image_key: str | None, label: str | None,
                 endpoint_url: str | None = None, ray: bool | None = True,
                 progress: bool = True):
    """`sagan.data.build_index` with the scan as Ray tasks (or here, with ray=False)."""
    from pipelines.ray_tasks import ray_map, use_ray

    map_fn = ray_map(f"indexing {spec}", progress=progress) if use_ray(ray) else None
    return build_index(spec, out, image_key=image_key, label=label, endpoint_url=endpoint_url,
                       map_fn=map_fn)


def summary(m) -> str:
    idx = m.index or {}
    kind = f"{m.num_classes} classes" if m.num_classes else "no labels (unconditional)"
    sizes = ", ".join(list(idx.get("image_sizes", {}))[:3])
    lines = [f"indexed {m.total} samples in {len(m.shards)} shards ({kind}; keys "
             f"{', '.join(idx.get('keys', {}))}; image sizes {sizes or '-'})",
             f"index: {m.location}/manifest.json  content hash "
             f"{m.content_hash()[:16]}"]
    for bad in idx.get("bad_shards", []):
        lines.append(f"bad shard (left out): {bad['name']}: {bad['error']}")
    skipped = idx.get("samples_without_image", 0) + idx.get("samples_with_bad_label", 0)
    if skipped:
        lines.append(f"{skipped} sample(s) without a readable image or label will be skipped")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    label = None if args.label in ("", "none") else args.label
    try:
        m = index_shards(args.shards, args.out, args.image_key, label, args.endpoint_url,
                         args.ray, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
