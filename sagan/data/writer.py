"""Writing a dataset: ``train-%06d.tar`` shards via ``webdataset.ShardWriter`` + ``manifest.json``,
to a local directory or an S3 prefix."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from sagan.errors import one_line

from .errors import DataError
from .manifest import MANIFEST_NAME, SHARD_PATTERN, SHARD_RE, Manifest, ShardInfo
from .storage import READ_CHUNK, local_path, resolve_endpoint, s3_client, scheme, split_s3


class _Destination:
    """Where finished shards and the manifest go: a local directory or an S3 prefix."""

    def __init__(self, out: str, endpoint_url: str | None) -> None:
        self.out = str(out).rstrip("/")
        kind = scheme(self.out)
        if kind in ("http", "https"):
            raise DataError(f"cannot write to {out}: http(s) is read-only; use a local "
                            "directory or s3://bucket/prefix")
        self.s3 = kind == "s3"
        if self.s3:
            self.bucket, self.prefix = split_s3(self.out)
            self.endpoint_url = resolve_endpoint(endpoint_url)
            self.client = s3_client(self.endpoint_url)
            self._check_bucket()
        else:
            self.out = os.path.abspath(local_path(self.out))
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as exc:
                raise DataError(f"cannot create output directory {self.out}: "
                                f"{exc.strerror}") from None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _check_bucket(self) -> None:
        import botocore.exceptions as bexc

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as exc:
            raise DataError(f"cannot write to s3://{self.bucket}: "
                            f"{one_line(exc, with_type=True)}") from None
        except bexc.BotoCoreError as exc:
            raise DataError(f"cannot reach S3 for s3://{self.bucket} "
                            f"(endpoint {self.endpoint_url or 'AWS'}): "
                            f"{one_line(exc, with_type=True)}") from None

    def tmpdir(self) -> str:
        # Local: inside the output dir, so finished shards move into place with an atomic rename.
        return tempfile.mkdtemp(prefix=".tmp-shards-", dir=None if self.s3 else self.out)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Storage errors while writing become one DataError line naming the object."""
        import boto3.exceptions
        import botocore.exceptions as bexc

        try:
            yield
        except (OSError, bexc.BotoCoreError, bexc.ClientError,
                boto3.exceptions.S3UploadFailedError) as exc:
            raise DataError(f"cannot {what} in {self.out}: "
                            f"{one_line(exc, with_type=True)}") from None

    def put_file(self, local: str, name: str) -> None:
        with self._io(f"write {name}"):
            if self.s3:
                self.client.upload_file(local, self.bucket, self._key(name))
                os.remove(local)
            else:
                os.replace(local, os.path.join(self.out, name))

    def put_bytes(self, data: bytes, name: str) -> None:
        with self._io(f"write {name}"):
            if self.s3:
                self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            else:
                tmp = os.path.join(self.out, f".{name}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(self.out, name))

    def delete(self, name: str) -> None:
        with self._io(f"delete {name}"):
            if self.s3:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
            else:
                try:
                    os.remove(os.path.join(self.out, name))
                except FileNotFoundError:
                    pass

    def list_names(self) -> list[str]:
        """File names directly under the prefix."""
        with self._io("list files"):
            return self._list_names()

    def _list_names(self) -> list[str]:
        if not self.s3:
            return sorted(os.listdir(self.out))
        names = []
        start = self._key("")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start)
        for page in pages:
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(start):]
                if rest and "/" not in rest:
                    names.append(rest)
        return sorted(names)


def _encode_png(arr: np.ndarray, channels: int) -> bytes:
    buf = io.BytesIO()  # uint8 (S, S) -> mode L, (S, S, 3) -> RGB
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _check_image(arr: Any, image_size: int, channels: int, index: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    want = (image_size, image_size) if channels == 1 else (image_size, image_size, 3)
    if a.dtype != np.uint8 or a.shape != want:
        raise DataError(f"sample {index}: image must be uint8 {want}, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def _check_label(label: Any, num_classes: int, index: int) -> int:
    try:
        value = int(label)
        ok = not isinstance(label, bool) and value == label and 0 <= value < num_classes
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"sample {index}: label {label!r} is not an integer in "
                        f"[0, {num_classes})")
    return value


def publish_bytes(out: str, name: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write one small file (a manifest, an index) under a local directory or S3 prefix,
    atomically (rename locally; a single PUT on S3)."""
    _Destination(out, endpoint_url).put_bytes(data, name)


def _check_header(image_size: int, channels: int, num_classes: int, samples_per_shard: int,
                  class_names: list[str] | None) -> list[str]:
    if image_size <= 0:
        raise DataError(f"image_size must be > 0, got {image_size}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if num_classes < 0:
        raise DataError(f"num_classes must be >= 0, got {num_classes}")
    if samples_per_shard <= 0:
        raise DataError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    names = list(class_names or [])
    if num_classes and not names:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"class_names has {len(names)} entries for num_classes={num_classes}")
    return names


def write_shards(samples_iterable: Iterable[Any], out: str, image_size: int, channels: int,
                 num_classes: int, class_names: list[str] | None, source: str,
                 samples_per_shard: int = 1000, endpoint_url: str | None = None) -> Manifest:
    """Write samples as ``train-%06d.tar`` shards + ``manifest.json`` under ``out``.

    Items are ``(image, label)`` or ``(image, label, key)``: image uint8 (S, S) / (S, S, 1) for
    channels=1 or (S, S, 3); label an int in [0, num_classes) (None when num_classes == 0); key
    a unique string without '.' (default: running index). Items are written in order.

    Crash- and re-run safety: an existing manifest is deleted first, each shard is written to a
    temp file and moved/uploaded only when complete, stale higher-numbered shards of an earlier
    run are deleted, and the manifest is written last, so a manifest only ever describes shards
    that exist, and a re-run with the same output leaves exactly the new set (no duplicates).
    Tar member mtimes are fixed, so identical input gives byte-identical shards and sha256s.
    The same three steps, with the middle one split over tasks, prepare a dataset in parallel
    (sagan/data/prepare.py): :func:`begin_shards`, :func:`write_shard_range`,
    :func:`publish_manifest`.
    """
    names = _check_header(image_size, channels, num_classes, samples_per_shard, class_names)
    begin_shards(out, endpoint_url)
    shards = write_shard_range(samples_iterable, out, image_size, channels, num_classes,
                               samples_per_shard, endpoint_url=endpoint_url)
    if not shards:
        raise DataError(f"no samples to write to {out}")
    return publish_manifest(out, shards, image_size, channels, num_classes, names, source,
                            endpoint_url)


def begin_shards(out: str, endpoint_url: str | None = None) -> None:
    """Step 1: delete the manifest, so the dataset reads as incomplete until step 3."""
    _Destination(out, endpoint_url).delete(MANIFEST_NAME)


def write_shard_range(samples_iterable: Iterable[Any], out: str, image_size: int,
                      channels: int, num_classes: int, samples_per_shard: int,
                      first_shard: int = 0, first_index: int = 0,
                      endpoint_url: str | None = None) -> list[ShardInfo]:
    """Step 2: shards ``first_shard``, ``first_shard + 1``, ... of ``samples_per_shard`` items
    each (see :func:`write_shards` for the items); ``first_index`` numbers the items in
    errors and default keys. Returns the shards written, in order."""
    dest = _Destination(out, endpoint_url)
    tmp = dest.tmpdir()
    shards: list[ShardInfo] = []
    writer: wds.ShardWriter | None = None
    seen_keys: set[str] = set()

    def finished(fname: str) -> None:
        assert writer is not None
        name = os.path.basename(fname)
        h = hashlib.sha256()
        with open(fname, "rb") as f:
            for chunk in iter(lambda: f.read(READ_CHUNK), b""):
                h.update(chunk)
        dest.put_file(fname, name)
        shards.append(ShardInfo(name, writer.count, h.hexdigest()))

    try:
        for index, item in enumerate(samples_iterable, start=first_index):
            if not isinstance(item, tuple | list) or len(item) not in (2, 3):
                raise DataError(f"sample {index}: expected (image, label[, key]), got "
                                f"{type(item).__name__}")
            img = _check_image(item[0], image_size, channels, index)
            label = item[1]
            key = str(item[2]) if len(item) == 3 else f"{index:09d}"
            if "." in key or not key or key in seen_keys:
                raise DataError(f"sample {index}: key {key!r} must be unique, non-empty and "
                                "without '.'")
            seen_keys.add(key)
            sample: dict[str, Any] = {"__key__": key, "png": _encode_png(img, channels)}
            if num_classes:
                sample["cls"] = str(_check_label(label, num_classes, index)).encode()
            elif label is not None:
                raise DataError(f"sample {index}: label {label!r} given but num_classes is 0")
            if writer is None:  # ShardWriter opens a shard on construction: only once needed
                writer = wds.ShardWriter(os.path.join(tmp, SHARD_PATTERN),
                                         maxcount=samples_per_shard, maxsize=float("inf"),
                                         post=finished, start_shard=first_shard, verbose=0,
                                         encoder=False, mtime=0, user="sagan", group="sagan")
            writer.write(sample)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None and getattr(writer, "tarstream", None) is not None:
            try:  # failed mid-shard: close the open temp shard, never publish it
                writer.tarstream.close()
            except Exception:  # noqa: BLE001 - already failing; the original error matters
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return shards


def publish_manifest(out: str, shards: list[ShardInfo], image_size: int, channels: int,
                     num_classes: int, class_names: list[str] | None, source: str,
                     endpoint_url: str | None = None) -> Manifest:
    """Step 3: delete shards of an earlier run that ``shards`` does not list (and temp dirs a
    crashed run left), then write the manifest."""
    dest = _Destination(out, endpoint_url)
    names = _check_header(image_size, channels, num_classes, 1, class_names)
    keep = {s.name for s in shards}
    for name in dest.list_names():
        if SHARD_RE.match(name) and name not in keep:
            dest.delete(name)
        elif name.startswith(".tmp-shards-") and not dest.s3:  # left by a crashed run
            shutil.rmtree(os.path.join(dest.out, name), ignore_errors=True)
    manifest = Manifest(source=source, image_size=image_size, channels=channels,
                        num_classes=num_classes, class_names=names, shards=shards,
                        total=sum(s.samples for s in shards), location=dest.out,
                        endpoint_url=dest.endpoint_url if dest.s3 else None)
    dest.put_bytes(manifest.to_json().encode(), MANIFEST_NAME)
    return manifest
