"""Which shards a ``data.path`` names when it is not one of our datasets: the ways WebDataset
users write shard sets, and where their index lives.

    s3://b/ds/train-{000000..001023}.tar     a brace list (webdataset's notation)
    s3://b/ds/  or  /data/shards/            every ``*.tar`` directly under a prefix/directory
    /data/shards/train-000000.tar            one shard

A path that holds a ``manifest.json`` (our shards, or an index written by ``index_data.py``)
is never a shard set: it is read as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from braceexpand import braceexpand

from .errors import DataError
from .storage import join, local_path, resolve_endpoint, s3_client, scheme, split_s3

INDEX_DIR = ".sagan-index"  # default home of an index, beside the shards it describes


@dataclass(frozen=True)
class ShardSet:
    """Shards named by one spec: ``base`` (absolute directory or URL prefix) + relative names."""

    spec: str
    base: str
    names: list[str]

    def urls(self) -> list[str]:
        return [join(self.base, n) for n in self.names]


def is_shard_spec(path: str) -> bool:
    """A brace list or a path to a single ``.tar``: certainly shards, never a manifest dir."""
    return "{" in path or path.rstrip("/").endswith(".tar")


def _absolute(path: str) -> str:
    return path if scheme(path) in ("s3", "http", "https") else \
        os.path.abspath(local_path(path))


def normalize(spec: str) -> str:
    """The spec as an index records it: absolute, without a trailing slash."""
    return _absolute(spec).rstrip("/")


def _split(spec: str) -> tuple[str, str]:
    """(base directory, pattern relative to it): the base ends before the first brace."""
    spec = _absolute(spec)
    head = spec.split("{", 1)[0]
    cut = head.rfind("/")
    return spec[:cut], spec[cut + 1:]


def list_tars(prefix: str, endpoint_url: str | None = None) -> list[str]:
    """Names of the ``*.tar`` objects directly under a local directory or ``s3://`` prefix."""
    prefix = _absolute(prefix).rstrip("/")
    kind = scheme(prefix)
    if kind in ("http", "https"):
        raise DataError(f"{prefix}: an http(s) prefix cannot be listed; name the shards with a "
                        "brace list (https://host/ds/train-{000000..000099}.tar)")
    if kind == "s3":
        import botocore.exceptions as bexc

        bucket, key = split_s3(prefix)
        start = f"{key}/" if key else ""
        client = s3_client(resolve_endpoint(endpoint_url))
        names: list[str] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=start, Delimiter="/"):
                names += [o["Key"][len(start):] for o in page.get("Contents", [])]
        except (bexc.ClientError, bexc.BotoCoreError) as exc:
            raise DataError(f"cannot list {prefix}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            names = os.listdir(prefix)
        except OSError as exc:
            raise DataError(f"cannot list {prefix}: {exc.strerror}") from None
    return sorted(n for n in names if n.endswith(".tar"))


def expand(spec: str, endpoint_url: str | None = None) -> ShardSet:
    """The shards ``spec`` names, each checked to exist (listing, not one request each).

    Raises DataError naming the first shard of a brace list that does not exist, or a prefix
    that holds no ``.tar``."""
    if not is_shard_spec(spec):
        base = _absolute(spec).rstrip("/")
        names = list_tars(base, endpoint_url)
        if not names:
            raise DataError(f"no manifest.json and no .tar shards at {base}")
        return ShardSet(normalize(spec), base, names)
    base, pattern = _split(spec)
    names = list(braceexpand(pattern))
    if len(set(names)) != len(names):
        raise DataError(f"{spec}: the brace list names a shard twice")
    if scheme(base) not in ("http", "https"):  # http cannot be listed: a scan reports it
        present: dict[str, set[str]] = {}
        for name in names:
            sub, _, leaf = name.rpartition("/")
            d = join(base, sub) if sub else base
            if d not in present:
                present[d] = set(list_tars(d, endpoint_url))
            if leaf not in present[d]:
                raise DataError(f"shard {join(base, name)} (named by {spec}) does not exist")
    return ShardSet(normalize(spec), base, names)


def index_location(spec: str, image_key: str | None, label: str | None) -> str:
    """Default home of the index of ``spec`` read with this image key and label: beside the
    shards, named after the pattern plus a hash of how it was read (two ways of reading the
    same shards are two indexes)."""
    base, pattern = _split(spec) if is_shard_spec(spec) else (_absolute(spec).rstrip("/"), "")
    readable = pattern.replace("..", "-").replace("{", "").replace("}", "")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", readable).strip("-.") or "all"
    digest = hashlib.sha256(f"{pattern}|{image_key}|{label}".encode()).hexdigest()[:8]
    return join(base, f"{INDEX_DIR}/{slug[:80]}-{digest}")
