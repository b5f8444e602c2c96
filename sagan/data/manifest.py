"""The dataset's table of contents: ``<prefix>/manifest.json`` (format: docs/DATA.md).

Read before streaming, so sizes, classes and the shard list are known up front; the per-shard
sample counts are also what lets the pipeline notice a shard that ended early.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DEFAULT_RETRY, DataError, RetryPolicy
from .storage import join, local_path, read_bytes, resolve_endpoint, scheme

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "train-%06d.tar"
SHARD_RE = re.compile(r"^train-(\d{6,})\.tar$")
FORMAT = "sagan-webdataset/1"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    name: str
    samples: int
    sha256: str


@dataclass
class Manifest:
    """What a dataset holds, read before streaming so sizes and classes are known up front.

    ``location`` (where it was loaded from) and ``endpoint_url`` are not part of the content:
    the same data under another prefix has the same :meth:`content_hash`.
    """

    source: str
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]
    shards: list[ShardInfo]
    total: int
    location: str = field(default="", compare=False)
    endpoint_url: str | None = field(default=None, compare=False, repr=False)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def url(self, shard_name: str) -> str:
        """Full URL/path of a shard (or any file) under this dataset's location."""
        return join(self.location, shard_name)

    def urls(self) -> list[str]:
        return [self.url(s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "total": self.total,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def content_hash(self) -> str:
        """Stable sha256 of the content (not the location): a cache key for real-image
        statistics, unchanged when the same shards are copied elsewhere."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: Any, location: str = "", endpoint_url: str | None = None
                  ) -> Manifest:
        """Parse and validate; DataError names the offending field."""
        where = join(location, MANIFEST_NAME) if location else MANIFEST_NAME

        def bad(fieldname: str, msg: str) -> DataError:
            return DataError(f"{where}: field '{fieldname}' {msg}")

        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object")
        for name, tp in (("source", str), ("image_size", int), ("channels", int),
                         ("num_classes", int), ("class_names", list), ("shards", list),
                         ("total", int)):
            if name not in d:
                raise bad(name, "is missing")
            if not isinstance(d[name], tp) or isinstance(d[name], bool):
                raise bad(name, f"must be {tp.__name__}, got {d[name]!r:.60}")
        if d["image_size"] <= 0:
            raise bad("image_size", f"must be > 0, got {d['image_size']}")
        if d["channels"] not in (1, 3):
            raise bad("channels", f"must be 1 or 3, got {d['channels']}")
        if d["num_classes"] < 0:
            raise bad("num_classes", f"must be >= 0, got {d['num_classes']}")
        names = d["class_names"]
        if names and len(names) != d["num_classes"]:
            raise bad("class_names", f"has {len(names)} names for {d['num_classes']} classes")
        shards = []
        for i, s in enumerate(d["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) \
                    or not isinstance(s.get("samples"), int) or s["samples"] < 0 \
                    or not isinstance(s.get("sha256"), str):
                raise bad(f"shards[{i}]", "must be {name: str, samples: int >= 0, sha256: str}")
            if "/" in s["name"] or s["name"] in ("", ".", ".."):
                raise bad(f"shards[{i}].name", f"must be a plain file name, got {s['name']!r}")
            shards.append(ShardInfo(s["name"], s["samples"], s["sha256"]))
        if len({s.name for s in shards}) != len(shards):
            raise bad("shards", "lists a shard twice")
        if sum(s.samples for s in shards) != d["total"]:
            raise bad("total", f"is {d['total']} but the shards hold "
                               f"{sum(s.samples for s in shards)}")
        return cls(source=d["source"], image_size=d["image_size"], channels=d["channels"],
                   num_classes=d["num_classes"], class_names=[str(n) for n in names],
                   shards=shards, total=d["total"], location=location,
                   endpoint_url=endpoint_url)


def load_manifest(path: str, endpoint_url: str | None = None,
                  policy: RetryPolicy = DEFAULT_RETRY) -> Manifest:
    """Read ``<path>/manifest.json`` from a local dir, ``s3://bucket/prefix`` or ``http(s)://``.

    ``path`` may also name the manifest file itself. Raises DataError (one line) when it is
    missing or invalid.
    """
    path = str(path).rstrip("/") or "/"
    if path.endswith("/" + MANIFEST_NAME) or path == MANIFEST_NAME:
        path = path[: -len(MANIFEST_NAME)].rstrip("/") or "."
    if scheme(path) in ("", "file"):
        path = os.path.abspath(local_path(path))  # loader workers may run in another cwd
    endpoint = resolve_endpoint(endpoint_url) if scheme(path) == "s3" else None
    url = join(path, MANIFEST_NAME)
    try:
        raw = read_bytes(url, endpoint, policy)
    except DataError as exc:
        if "NoSuchKey" in str(exc) or "not found" in str(exc) or "404" in str(exc):
            raise DataError(f"no {MANIFEST_NAME} at {path} (prepare the dataset first: "
                            f"python pipelines/prepare_data.py SOURCE {path})") from None
        raise
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{url}: invalid JSON ({exc})") from None
    return Manifest.from_dict(data, location=path, endpoint_url=endpoint)
