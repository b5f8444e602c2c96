"""An index of WebDataset shards the ecosystem wrote (img2dataset, ``webdataset.ShardWriter``,
public datasets): a manifest that points at the original shards, so they train as they are.

The scan reads each shard once: sample count (as the loaders' ``group_by_keys`` counts them, so
the "shard ended early" check holds), sha256, which member keys exist, image sizes and modes
(PIL reads headers only), and labels. No image is decoded in full or re-encoded. One shard is one
unit of work (:func:`scan_shard`), so a caller can fan the scan out (pipelines/index_data.py runs
it as Ray tasks); :func:`build_index` merges the results and writes ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DEFAULT_RETRY, Counters, DataError, RetryPolicy
from .manifest import INDEX_FORMAT, MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from .shardlist import ShardSet, expand, index_location
from .storage import join, open_url, scheme
from .writer import publish_bytes

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the default image key: the first one present
MAX_SIZES = 20  # distinct image sizes kept in the index (most common first)

Mapper = Callable[[Callable[..., dict], list[tuple]], Iterable[dict]]


def image_key_of(sample: dict[str, Any], image_key: str | None) -> str | None:
    """The member holding the image: ``image_key``, or the first of IMAGE_KEYS present."""
    if image_key:
        return image_key if image_key in sample else None
    return next((k for k in IMAGE_KEYS if k in sample), None)


def label_of(sample: dict[str, Any], label: str | None) -> int | str | None:
    """The raw label: ``cls`` (or any text member) as int when it is one, else the text;
    ``json:FIELD[.SUB]`` a field of the json member. None when absent. Raises ValueError when
    the member is there but unreadable."""
    if not label:
        return None
    key, _, path = label.partition(":")
    raw = sample.get(key)
    if raw is None:
        return None
    if path:
        value: Any = json.loads(raw)
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
    else:
        value = raw.decode("utf-8").strip()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"label {value!r:.30} is not an int or a string")
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


class _Hashing(io.RawIOBase):
    """A stream that hashes what passes through it (the shard's sha256 at no extra read)."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._stream.readinto(b)
        if n:
            self.sha256.update(memoryview(b)[:n])
            self.size += n
        return n

    def drain(self) -> None:
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass


def scan_shard(base: str, name: str, image_key: str | None, label: str | None,
               endpoint_url: str | None = None, policy: RetryPolicy = DEFAULT_RETRY) -> dict:
    """What one shard holds. A shard that cannot be read (not a tar, cut short, unreachable
    after retries) is reported with ``error``, not raised: the index lists it as bad."""
    url = join(base, name)
    out: dict[str, Any] = {"name": name, "samples": 0, "sha256": "", "keys": Counter(),
                           "sizes": Counter(), "modes": Counter(), "labels": Counter(),
                           "no_image": 0, "bad_labels": 0}
    try:
        stream = _Hashing(open_url(url, endpoint_url=endpoint_url, counters=Counters(),
                                   policy=policy))
        with stream:
            def fail(exc: BaseException) -> bool:
                raise exc

            files = tar_file_expander([{"url": url, "stream": stream}], handler=fail)
            for sample in group_by_keys(files, handler=fail):
                _scan_sample(sample, image_key, label, out)
            stream.drain()
        out["sha256"] = stream.sha256.hexdigest()
    except DataError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
        first = str(exc.args[0]).split(" @ ", 1)[0] if exc.args else repr(exc)
        out["error"] = f"{type(exc).__name__}: {first}"
    return out


def _scan_sample(sample: dict[str, Any], image_key: str | None, label: str | None,
                 out: dict[str, Any]) -> None:
    out["samples"] += 1
    out["keys"].update(k for k in sample if not k.startswith("__"))
    key = image_key_of(sample, image_key)
    if key is None:
        out["no_image"] += 1
        return
    try:
        with Image.open(io.BytesIO(sample[key])) as im:  # header only
            out["sizes"][f"{im.size[0]}x{im.size[1]}"] += 1
            out["modes"][im.mode] += 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        out["no_image"] += 1
        return
    try:
        value = label_of(sample, label)
    except (ValueError, UnicodeDecodeError):
        out["bad_labels"] += 1
        return
    if value is not None:
        out["labels"][value] += 1


def _sequential(fn: Callable[..., dict], items: list[tuple]) -> Iterable[dict]:
    return (fn(*item) for item in items)


def build_index(spec: str, out: str | None = None, image_key: str | None = None,
                label: str | None = "cls", endpoint_url: str | None = None,
                map_fn: Mapper | None = None) -> Manifest:
    """Scan the shards ``spec`` names (``shardlist.expand``) and write their index to ``out``
    (default ``shardlist.index_location``). ``map_fn(scan_shard, argument tuples)`` yields the
    scans in any order (default: one after another, here); pipelines/index_data.py passes Ray.

    Bad shards are listed in the index and left out of training, not fatal. Fatal, one line: a
    missing shard, a readable shard none of whose samples has the image member (naming the
    keys it has), no readable shard at all."""
    endpoint = endpoint_url if scheme(spec) == "s3" else None
    shards = expand(spec, endpoint)
    jobs = [(shards.base, n, image_key, label, endpoint) for n in shards.names]
    scans = {s["name"]: s for s in (map_fn or _sequential)(scan_shard, jobs)}
    manifest = merge_scans(shards, [scans[n] for n in shards.names], image_key, label)
    where = out or index_location(spec, image_key, label)
    publish_bytes(where, MANIFEST_NAME, manifest.to_json().encode(), endpoint)
    return load_manifest(where, endpoint)


def merge_scans(shards: ShardSet, scans: list[dict], image_key: str | None,
                label: str | None) -> Manifest:
    """One manifest from the per-shard scans, in the order the spec names the shards."""
    good, bad = [], []
    totals: dict[str, Counter] = {k: Counter() for k in ("keys", "sizes", "modes", "labels")}
    for s in scans:
        if "error" in s:
            bad.append({"name": s["name"], "error": s["error"]})
            continue
        if s["samples"] and s["no_image"] == s["samples"]:
            want = image_key or " / ".join(IMAGE_KEYS)
            has = ", ".join(sorted(s["keys"])) or "none"
            raise DataError(f"shard {join(shards.base, s['name'])} has no image member "
                            f"'{want}' (its samples have: {has}); set data.image_key "
                            "(index_data.py --image-key)")
        good.append(s)
        for k in totals:
            totals[k].update(s[k])
    if not good:
        raise DataError(f"no readable shard in {shards.spec}: "
                        + "; ".join(f"{b['name']}: {b['error']}" for b in bad[:3]))
    labels = totals["labels"]
    by_name = any(isinstance(v, str) for v in labels)
    if by_name:  # text labels: classes are the sorted names
        class_names = sorted({str(v) for v in labels})
        num_classes = len(class_names)
    else:
        class_names, num_classes = [], (max(labels) + 1 if labels else 0)
        if labels and min(labels) < 0:
            raise DataError(f"{shards.spec}: label {min(labels)} is negative")
    sizes = totals["sizes"].most_common()
    w, h = (int(v) for v in sizes[0][0].split("x")) if sizes else (0, 0)
    colour = sum(n for m, n in totals["modes"].items() if m not in ("L", "1", "I;16", "I", "F"))
    index = {
        "spec": shards.spec, "image_key": image_key, "label": label,
        "labels": "names" if by_name else "ids",
        "keys": dict(sorted(totals["keys"].items())),
        "image_sizes": dict(sizes[:MAX_SIZES]),
        "modes": dict(sorted(totals["modes"].items())),
        "class_counts": {str(k): n for k, n in sorted(labels.items(), key=lambda kv: str(kv[0]))},
        "label_range": {s["name"]: [min(s["labels"]), max(s["labels"])] for s in good
                        if s["labels"] and not by_name},
        "samples_without_image": sum(s["no_image"] for s in good),
        "samples_with_bad_label": sum(s["bad_labels"] for s in good),
        "bad_shards": bad,
    }
    shard_infos = [ShardInfo(s["name"], s["samples"], s["sha256"]) for s in good]
    return Manifest(source=f"index of {shards.spec}", image_size=max(w, h, 1),
                    channels=3 if colour else 1, num_classes=num_classes,
                    class_names=class_names, shards=shard_infos,
                    total=sum(s.samples for s in shard_infos), shard_base=shards.base,
                    index=index)


__all__ = ["IMAGE_KEYS", "INDEX_FORMAT", "build_index", "image_key_of", "label_of",
           "merge_scans", "scan_shard"]
