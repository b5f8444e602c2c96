"""The dataset's table of contents: ``<prefix>/manifest.json`` (format: docs/DATA.md).

Read before streaming, so sizes, classes and the shard list are known up front; the per-shard
sample counts are also what lets the pipeline notice a shard that ended early.

Two formats share this class: our own shards (``FORMAT``: PNGs already at the model's size) and
an *index* of shards the ecosystem wrote (``INDEX_FORMAT``, sagan/data/index.py): the same
fields plus ``shard_base`` (where the original shards live, not re-encoded) and ``index`` (how to
read a sample: image key, label, and what the scan saw). An index is decoded and resized in the
loader workers to the size it is bound to (:meth:`Manifest.bind`).
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
INDEX_FORMAT = "sagan-webdataset-index/1"


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
    # An index of foreign shards: where they live, and how a sample is read (sagan/data/index.py).
    shard_base: str = field(default="", compare=False)
    index: dict[str, Any] | None = None
    # How an index's images are fitted to image_size (set by bind(); not part of the content).
    fit: str = field(default="crop", compare=False, repr=False)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def is_index(self) -> bool:
        return self.index is not None

    def url(self, shard_name: str) -> str:
        """Full URL/path of a shard under this dataset's shards (or any file under its
        location)."""
        return join(self.shard_base or self.location, shard_name)

    def bind(self, image_size: int, channels: int, fit: str = "crop",
             num_classes: int | None = None) -> Manifest:
        """This index as the loaders should deliver it to a model: decoded, fitted to
        ``image_size`` with ``fit``, converted to ``channels``; labels dropped when
        ``num_classes`` is 0 (unconditional training on labelled shards). Our own shards are
        returned unchanged (they already are one size; preflight checks it fits)."""
        if not self.is_index:
            return self
        keep = self.num_classes if num_classes is None or num_classes > 0 else 0
        return dataclasses.replace(self, image_size=image_size, channels=channels, fit=fit,
                                   num_classes=keep,
                                   class_names=self.class_names if keep else [])

    def urls(self) -> list[str]:
        return [self.url(s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.index is None else {"shard_base": self.shard_base,
                                               "index": self.index}
        return {
            "format": INDEX_FORMAT if self.is_index else FORMAT,
            "source": self.source,
            "image_size": self.image_size,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "total": self.total,
            **extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def content_hash(self) -> str:
        """Stable sha256 of the content (not the location): a cache key for real-image
        statistics, unchanged when the same shards are copied elsewhere."""
        content = self.to_dict()
        if self.index is not None:  # the same shards indexed elsewhere hash the same; how they
            content.pop("shard_base")  # are fitted to image_size is part of what they deliver
            content["index"] = {**self.index, "spec": None, "fit": self.fit}
        canon = json.dumps(content, sort_keys=True, separators=(",", ":"))
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
            # an index may name shards in sub-directories of shard_base (brace lists can span them)
            parts = s["name"].split("/")
            if any(p in ("", ".", "..") for p in parts) or \
                    (len(parts) > 1 and d.get("format") != INDEX_FORMAT):
                raise bad(f"shards[{i}].name", f"must be a plain file name, got {s['name']!r}")
            shards.append(ShardInfo(s["name"], s["samples"], s["sha256"]))
        if len({s.name for s in shards}) != len(shards):
            raise bad("shards", "lists a shard twice")
        if sum(s.samples for s in shards) != d["total"]:
            raise bad("total", f"is {d['total']} but the shards hold "
                               f"{sum(s.samples for s in shards)}")
        index = None
        if d.get("format") == INDEX_FORMAT:
            if not isinstance(d.get("shard_base"), str) or not d["shard_base"]:
                raise bad("shard_base", "must be the shards' location (a non-empty string)")
            if not isinstance(d.get("index"), dict):
                raise bad("index", "must be an object")
            index = d["index"]
        elif d.get("format", FORMAT) != FORMAT:
            raise bad("format", f"must be {FORMAT} or {INDEX_FORMAT}, got {d['format']!r:.60}")
        return cls(source=d["source"], image_size=d["image_size"], channels=d["channels"],
                   num_classes=d["num_classes"], class_names=[str(n) for n in names],
                   shards=shards, total=d["total"], location=location,
                   endpoint_url=endpoint_url, shard_base=d.get("shard_base") or "",
                   index=index)


class NotIndexed(DataError):
    """``path`` names shards the ecosystem wrote, and no index of them exists yet at
    ``location``: build one (pipelines/index_data.py; training does it on first use)."""

    def __init__(self, spec: str, location: str) -> None:
        super().__init__(f"shards {spec} are not indexed yet (no {MANIFEST_NAME} at {location}): "
                         f"python pipelines/index_data.py '{spec}'")
        self.spec, self.location = spec, location


def load_manifest(path: str, endpoint_url: str | None = None,
                  policy: RetryPolicy = DEFAULT_RETRY, *, index: str | None = None,
                  image_key: str | None = None, label: str | None = "cls") -> Manifest:
    """Read ``<path>/manifest.json`` from a local dir, ``s3://bucket/prefix`` or ``http(s)://``.

    ``path`` may also name the manifest file itself, or shards without a manifest (a brace list,
    a prefix of ``.tar`` files: sagan/data/shardlist.py); their index is read from ``index``, or
    from its default place beside them for this ``image_key`` and ``label``. Raises DataError
    (one line) when it is missing or invalid; :class:`NotIndexed` for shards with no index.
    """
    from .shardlist import is_shard_spec

    path = str(path).rstrip("/") or "/"
    if path.endswith("/" + MANIFEST_NAME) or path == MANIFEST_NAME:
        path = path[: -len(MANIFEST_NAME)].rstrip("/") or "."
    if scheme(path) in ("", "file"):
        path = os.path.abspath(local_path(path))  # loader workers may run in another cwd
    endpoint = resolve_endpoint(endpoint_url) if scheme(path) == "s3" else None
    if is_shard_spec(path):
        return _load_index(path, endpoint, policy, index, image_key, label)
    try:
        raw = read_bytes(join(path, MANIFEST_NAME), endpoint, policy)
    except DataError as exc:
        if not _missing(exc):
            raise
        if scheme(path) not in ("http", "https") and _has_tars(path, endpoint):
            return _load_index(path, endpoint, policy, index, image_key, label)
        raise DataError(f"no {MANIFEST_NAME} at {path} (prepare the dataset first: "
                        f"python pipelines/prepare_data.py SOURCE {path}, or index existing "
                        f"shards: python pipelines/index_data.py 'SHARDS')") from None
    return _parse(raw, path, endpoint)


def _has_tars(path: str, endpoint: str | None) -> bool:
    from .shardlist import list_tars

    try:
        return bool(list_tars(path, endpoint))
    except DataError:  # not a directory / prefix we can list: no shards there either
        return False


def _missing(exc: DataError) -> bool:
    return "NoSuchKey" in str(exc) or "not found" in str(exc) or "404" in str(exc)


def _parse(raw: bytes, path: str, endpoint: str | None) -> Manifest:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{join(path, MANIFEST_NAME)}: invalid JSON ({exc})") from None
    return Manifest.from_dict(data, location=path, endpoint_url=endpoint)


def _load_index(spec: str, endpoint: str | None, policy: RetryPolicy, index: str | None,
                image_key: str | None, label: str | None) -> Manifest:
    from .shardlist import index_location, normalize

    where = str(index).rstrip("/") if index else index_location(spec, image_key, label)
    ep = endpoint or (resolve_endpoint(None) if scheme(where) == "s3" else None)
    try:
        raw = read_bytes(join(where, MANIFEST_NAME), ep, policy)
    except DataError as exc:
        if _missing(exc):
            raise NotIndexed(spec, where) from None
        raise
    m = _parse(raw, where, ep)
    if not m.is_index or m.index.get("spec") != normalize(spec):
        raise DataError(f"{join(where, MANIFEST_NAME)} is not an index of {normalize(spec)} "
                        f"(it describes {m.source}); use another data.index")
    if (m.index.get("image_key"), m.index.get("label")) != (image_key, label):
        raise DataError(f"{join(where, MANIFEST_NAME)} was built with image key "
                        f"{m.index.get('image_key')!r} and label {m.index.get('label')!r}, not "
                        f"{image_key!r} and {label!r}; rebuild it (index_data.py) or use another "
                        "data.index")
    return m
