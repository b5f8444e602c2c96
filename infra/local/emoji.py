"""A real RGB image set, offline: Google's Noto emoji (64x64 PNGs, Apache-2.0; the npm package
`emoji-datasource-google`, MIT) written as *foreign* WebDataset shards, the way the ecosystem
writes them: `webdataset.ShardWriter`, members `jpg` + `cls` + `json`, names
`emoji-<split>-%06d.tar`. Nothing of ours (no manifest, no PNG re-encode at our size), so the
shards exercise the index path (docs/DATA.md) exactly as a user's own would.

    python -m infra.local.emoji s3://sagan/emoji              # train + test splits
    python -m infra.local.emoji /data/emoji --split test --per-shard 200

Class = the emoji's category in `emoji.json` (9 classes; the 5 skin-tone swatches of
"Component" are left out), skin-tone variants included. Split: 15% of images held out by a hash
of the file name, so the split never changes. Transparent pixels are composited on white (a JPEG
has no alpha). The package is fetched once with `npm pack` into ~/.cache/sagan/emoji.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "16.0.0"
PACKAGE = f"emoji-datasource-google@{VERSION}"
CACHE = Path(os.environ.get("SAGAN_EMOJI_CACHE", "~/.cache/sagan/emoji")).expanduser()
TEST_PERCENT = 15
SKIP_CATEGORIES = {"Component"}


def ensure_package(cache: Path = CACHE) -> Path:
    """The unpacked npm package directory (fetched with `npm pack` on first use)."""
    root = cache / f"package-{VERSION}"
    if (root / "emoji.json").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            sys.exit("error: npm is missing (apt-get install npm) to fetch " + PACKAGE)
        except subprocess.CalledProcessError as exc:
            sys.exit(f"error: npm pack {PACKAGE} failed: {exc.stderr.strip()[-300:]}")
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and (
                m.name.startswith("package/img/google/64/") or m.name.count("/") == 1)]
            tf.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / "package", root)
    return root


def images(root: Path) -> list[tuple[str, str]]:
    """(file name, category) of every 64 px image, base emoji and skin-tone variants."""
    out = []
    for e in json.loads((root / "emoji.json").read_text()):
        if e["category"] in SKIP_CATEGORIES:
            continue
        for item in [e, *e.get("skin_variations", {}).values()]:
            if item.get("has_img_google") and (root / "img/google/64" / item["image"]).is_file():
                out.append((item["image"], e["category"]))
    return sorted(set(out))


def split_of(name: str) -> str:
    return "test" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < TEST_PERCENT \
        else "train"


def jpeg_on_white(path: Path, quality: int = 95) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    buf = io.BytesIO()
    flat.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write(out: str, split: str, per_shard: int = 500, labels: bool = True,
          endpoint_url: str | None = None) -> tuple[int, int, list[str]]:
    """Write one split as `emoji-<split>-%06d.tar` under `out` (local dir or s3://); returns
    (images, shards, class names)."""
    import webdataset as wds

    root = ensure_package()
    items = sorted(((n, c) for n, c in images(root) if split_of(n) == split),  # shuffled
                   key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    classes = sorted({c for _, c in images(root)})
    with tempfile.TemporaryDirectory() as tmp:
        with wds.ShardWriter(f"{tmp}/emoji-{split}-%06d.tar", maxcount=per_shard,
                             verbose=0) as sink:
            for name, category in items:
                sample = {"__key__": name.removesuffix(".png").replace(".", "_"),
                          "jpg": jpeg_on_white(root / "img/google/64" / name),
                          "json": {"file": name, "category": category}}
                if labels:
                    sample["cls"] = classes.index(category)
                sink.write(sample)
        shards = sorted(Path(tmp).glob("*.tar"))
        _upload(shards, out, endpoint_url)
    return len(items), len(shards), classes


def _upload(files: list[Path], out: str, endpoint_url: str | None) -> None:
    if not out.startswith("s3://"):
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.move(f, Path(out) / f.name)
        return
    import boto3

    bucket, _, prefix = out[len("s3://"):].partition("/")
    # a fresh session reads the credentials in the environment now (boto3's default session
    # keeps the first ones it saw in this process)
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"))
    for f in files:
        client.upload_file(str(f), bucket, f"{prefix.rstrip('/')}/{f.name}".lstrip("/"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.local.emoji",
                                 description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="local directory or s3://bucket/prefix")
    ap.add_argument("--split", choices=("train", "test", "both"), default="both")
    ap.add_argument("--per-shard", type=int, default=500, help="images per shard (default 500)")
    ap.add_argument("--no-labels", action="store_true", help="jpg + json only, no cls")
    ap.add_argument("--endpoint-url", default=None, help="S3 endpoint (default AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    if args.per_shard <= 0:
        ap.error("--per-shard must be > 0")
    for split in ("train", "test") if args.split == "both" else (args.split,):
        n, shards, classes = write(args.out, split, args.per_shard, not args.no_labels,
                                   args.endpoint_url)
        print(f"{split}: {n} images in {shards} shards -> {args.out.rstrip('/')}/"
              f"emoji-{split}-{{000000..{shards - 1:06d}}}.tar ({len(classes)} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
