"""WebDataset shards in local directories or object storage, streamed into training.

Layout of a dataset (ARCHITECTURE.md §5): ``<prefix>/train-%06d.tar`` shards written by
``webdataset.ShardWriter``, each sample a ``__key__`` with a ``png`` member and, for conditional
sets, a ``cls`` member (decimal text); plus ``<prefix>/manifest.json`` with the source, image size,
channels, class names, per-shard sample count and sha256, and the total. ``<prefix>`` is a local
directory, ``s3://bucket/prefix`` (any S3-compatible store) or an ``http(s)://`` URL prefix.

Why the pieces look the way they do:

* **Streaming, in-process reads.** ``s3://`` URLs are opened by :func:`gopen_s3`, registered in
  ``webdataset.gopen_schemes``: one boto3 GET per shard, its body read straight into the tar
  parser by a read-ahead thread (network overlaps decoding); nothing is copied to local disk.
  ``http(s)://`` uses the same resumable reader over ``urllib`` instead of webdataset's ``curl``
  pipe, so retries are counted and no external binary is needed.
* **Exactly once, even when a connection breaks.** The reader remembers how many bytes it has
  handed to the tar parser; a broken stream is re-opened with ``Range: bytes=<offset>-`` (and
  ``If-Match: <etag>`` so a concurrently rewritten object is never spliced). The parser never
  sees the break, so a pass delivers every sample exactly once.
* **Failures are counted, never silent, never a hang.** Transient errors (connection reset or
  refused, timeouts, 5xx, throttling) are retried with exponential backoff (botocore's own retry
  config for each request, plus our loop around it and around mid-stream reads). A shard that stays
  unreadable, is not a tar, is truncated, or fails its sha256 is skipped with a warning; corrupt
  samples (bad PNG, wrong size/mode, missing or invalid label) are skipped; both are counted in
  :class:`DataStats`. Credential/bucket errors, an endpoint unreachable for
  ``RetryPolicy.max_outage_s``, or a stream in which no shard yields a single valid sample raise
  :class:`DataError` with one clear line.
* **DDP-safe training stream.** Shards are split by rank (explicit ``rank``/``world_size``, not
  only the environment) and by loader worker, sampled with replacement (``resampled``), shuffled
  in a buffer, and cut into epochs of exactly ``batches_per_epoch`` batches on every rank (the
  ``with_epoch`` contract), so no rank can run out of data and hang a collective.
* **Counts reach the main process.** With ``loader_workers > 0`` the counting happens in worker
  processes; every batch carries the count deltas since the previous batch of that worker, and
  :class:`TrainLoader` strips them and accumulates ``loader.stats`` in the caller's process.

This module never imports ray or mlflow (ARCHITECTURE.md §1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import http.client
import io
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DataStats",
    "EvalLoader",
    "Manifest",
    "RetryPolicy",
    "ShardInfo",
    "TrainLoader",
    "eval_loader",
    "gopen_s3",
    "load_manifest",
    "open_url",
    "resolve_endpoint",
    "train_loader",
    "write_shards",
]

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "train-%06d.tar"
SHARD_RE = re.compile(r"^train-(\d{6,})\.tar$")
FORMAT = "sagan-webdataset/1"
READ_CHUNK = 1 << 20  # read-ahead chunk: big enough that per-call overhead vanishes
READ_AHEAD_CHUNKS = 8  # per open shard: 8 MiB buffered ahead of the tar parser
MAX_SAMPLE_WARNINGS = 10  # per stream; after that only the counts grow


class DataError(RuntimeError):
    """The data cannot be read or written; the message is one line naming the file or field."""


class ShardReadError(OSError):
    """One shard cannot be read (after retries); the stream skips it and counts it."""


# --------------------------------------------------------------------------- counters


@dataclass
class DataStats:
    """Counts a training job logs. ``samples``: delivered in batches; ``skipped_samples``: read but
    rejected (undecodable PNG, wrong size/mode, missing/invalid label); ``skipped_shards``: shard
    reads that did not complete (unreadable after retries, not a tar, truncated, sha256 mismatch;
    samples read before the break are still delivered, once); ``retries``: request re-attempts,
    botocore's and ours."""

    skipped_samples: int = 0
    skipped_shards: int = 0
    retries: int = 0
    samples: int = 0

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Flat dict for metric logging."""
        return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


class _Counters:
    """Monotonic, thread-safe counters of one stream (read-ahead threads count retries while the
    consumer counts skipped samples, so plain ``+=`` could lose updates)."""

    FIELDS = ("skipped_samples", "skipped_shards", "retries")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.FIELDS, 0)
        self._taken = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._values[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def take_delta(self) -> tuple[int, int, int]:
        """Counts since the previous call, as a small picklable tuple to ride along a batch."""
        with self._lock:
            delta = tuple(self._values[k] - self._taken[k] for k in self.FIELDS)
            self._taken = dict(self._values)
        return delta  # type: ignore[return-value]


_DEFAULT_COUNTERS = _Counters()  # for plain webdataset users of gopen("s3://...")


# --------------------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a shard, and on the endpoint as a whole.

    ``attempts`` re-opens per shard without progress (each a request with botocore's own
    ``request_attempts``), backoff ``base_delay * 2**k`` capped at ``max_delay`` with jitter in
    [0.5, 1]. The defaults ride out a ~5-10 s outage; ``max_outage_s`` bounds how long a stream
    keeps trying when nothing at all succeeds, so a dead endpoint ends in a DataError, not a hang.
    """

    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 4.0
    max_outage_s: float = 20.0
    request_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 20.0

    def delay(self, failures: int) -> float:
        """Backoff before re-attempt number `failures` (1-based)."""
        d = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return d * (0.5 + 0.5 * random.random())


DEFAULT_RETRY = RetryPolicy()


class _Health:
    """Time since anything last succeeded on this stream: the 'never hang' clock."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.last_ok = time.monotonic()

    def ok(self) -> None:
        self.last_ok = time.monotonic()

    def check(self, where: str, exc: BaseException) -> None:
        idle = time.monotonic() - self.last_ok
        if idle > self.policy.max_outage_s:
            raise DataError(f"storage unreachable for {idle:.0f}s while reading {where}: "
                            f"{_describe(exc)}")


# --------------------------------------------------------------------------- locations


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """Config value first, then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``; None = AWS."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _scheme(path: str) -> str:
    p = path.split("://", 1)
    return p[0].lower() if len(p) == 2 else ""


def _split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"invalid S3 URL '{url}': expected s3://bucket/prefix")
    return bucket, key


def _join(prefix: str, name: str) -> str:
    if _scheme(prefix) in ("s3", "http", "https"):
        return prefix.rstrip("/") + "/" + name
    if _scheme(prefix) == "file":
        prefix = urllib.parse.urlparse(prefix).path
    return os.path.join(prefix, name)


def _local_path(path: str) -> str:
    if _scheme(path) == "file":
        return urllib.parse.unquote(urllib.parse.urlparse(path).path)
    return os.path.expanduser(path)


# --------------------------------------------------------------------------- boto3 clients

_TLS = threading.local()  # per-thread count of HTTP attempts of the current boto3 call
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_SESSIONS: dict[tuple[str | None, str | None], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    """A forked loader worker must not reuse the parent's clients (their connection pools are
    shared sockets) or a lock another parent thread held at fork time."""
    global _CLIENTS_LOCK
    _CLIENTS_LOCK = threading.Lock()
    _CLIENTS.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def _count_attempt(**_: Any) -> None:
    """botocore 'before-send' hook: fires once per HTTP attempt, retries included; lets us
    report botocore's internal retries, which are otherwise invisible."""
    _TLS.attempts = getattr(_TLS, "attempts", 0) + 1


def s3_client(endpoint_url: str | None = None, policy: RetryPolicy = DEFAULT_RETRY) -> Any:
    """A cached boto3 S3 client for this process (clients are thread-safe, not fork-safe, so the
    cache is keyed by pid). Credentials come from the normal boto3 chain, never from config."""
    import boto3
    from botocore.config import Config

    endpoint_url = resolve_endpoint(endpoint_url)
    # Identity in the key (not the secret): a changed key id or profile gets a fresh client.
    identity = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    key = (os.getpid(), endpoint_url, identity, policy.request_attempts,
           policy.connect_timeout, policy.read_timeout)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            # Sessions survive fork (no sockets; their loaded service models make a worker's
            # client ~6x cheaper to build), clients do not (see _reset_after_fork).
            session = _SESSIONS.get(identity)
            if session is None:
                session = _SESSIONS[identity] = boto3.session.Session()
            region = session.region_name or "us-east-1"
            cfg = Config(
                retries={"mode": "standard", "total_max_attempts": policy.request_attempts},
                connect_timeout=policy.connect_timeout,
                read_timeout=policy.read_timeout,
                max_pool_connections=32,
                tcp_keepalive=True,
                # Custom endpoints (MinIO, Ceph, moto) rarely have wildcard DNS for buckets.
                s3={"addressing_style": "path"} if endpoint_url else None,
                # We verify shards by sha256 when asked; per-request CRCs only cost CPU here.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = session.client("s3", endpoint_url=endpoint_url, region_name=region,
                                    config=cfg)
            client.meta.events.register("before-send.s3", _count_attempt)
            _CLIENTS[key] = client
    return client


def _call_s3(counters: _Counters, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one boto3 call, adding botocore's internal re-attempts to ``counters.retries``."""
    _TLS.attempts = 0
    try:
        return fn(**kwargs)
    finally:
        counters.add("retries", max(0, getattr(_TLS, "attempts", 0) - 1))


# --------------------------------------------------------------------------- error taxonomy

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestLimitExceeded", "TooManyRequests", "InternalError",
                   "ServiceUnavailable", "RequestThrottled"}
_FATAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                "AllAccessDisabled", "InvalidBucketName", "ExpiredToken", "InvalidToken"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


class _ShortRead(OSError):
    """The server closed the body before Content-Length bytes arrived."""


def _client_error_info(exc: BaseException) -> tuple[int, str]:
    resp = getattr(exc, "response", None) or {}
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(resp.get("Error", {}).get("Code", ""))
    return status, code


def _is_transient(exc: BaseException) -> bool:
    """Worth another attempt: the same request may well succeed in a moment."""
    import botocore.exceptions as bexc
    import urllib3.exceptions as u3exc

    if isinstance(exc, bexc.ClientError):
        status, code = _client_error_info(exc)
        return status >= 500 or status == 429 or code in _THROTTLE_CODES
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, bexc.SSLError):
        return False
    if isinstance(exc, bexc.ConnectionError | bexc.HTTPClientError | bexc.IncompleteReadError):
        return True
    if isinstance(exc, u3exc.HTTPError | http.client.HTTPException | _ShortRead):
        return True
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, OSError | str)
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _is_fatal(exc: BaseException) -> bool:
    """Affects every shard alike (credentials, bucket): stop the stream with a DataError."""
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return True
    if isinstance(exc, bexc.ClientError):
        status, code = _client_error_info(exc)
        return code in _FATAL_CODES or status == 403
    return isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403)


def _describe(exc: BaseException) -> str:
    """One line, no traceback: 'ClientError: An error occurred (NoSuchKey) ...'."""
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- readers


class _ResumableStream(io.RawIOBase):
    """A remote object as a forward-only byte stream that survives broken connections.

    `open_at(offset, etag)` returns (body, total_size_or_None, etag); on a transient failure the
    body is re-opened at the number of bytes already returned, so the consumer sees one
    uninterrupted stream. Opening is lazy (first read), so a read-ahead thread does it.
    """

    def __init__(self, url: str,
                 open_at: Callable[[int, str | None], tuple[Any, int | None, str | None]],
                 counters: _Counters, policy: RetryPolicy, health: _Health) -> None:
        super().__init__()
        self.url = url
        self._open_at = open_at
        self._counters = counters
        self._policy = policy
        self._health = health
        self._body: Any = None
        self._pos = 0
        self._size: int | None = None
        self._etag: str | None = None
        self._failures = 0
        self._opened = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._opened and self._size is not None and self._pos >= self._size:
            return 0
        while True:
            if self.closed:  # closed from another thread: never re-open behind its back
                raise ShardReadError(f"{self.url}: stream closed")
            try:
                if self._body is None:
                    self._body, size, etag = self._open_at(self._pos, self._etag)
                    self._opened = True
                    self._size = size if size is not None else self._size
                    self._etag = etag or self._etag
                    if self._size is not None and self._pos >= self._size:
                        return 0
                n = self._body.readinto(b)
                if not n and len(b) and self._size is not None and self._pos < self._size:
                    raise _ShortRead(f"body ended at byte {self._pos} of {self._size}")
            except DataError:
                raise
            except Exception as exc:  # classified below; anything unexpected ends the shard
                self._on_failure(exc)
                continue
            self._pos += n
            self._failures = 0
            self._health.ok()
            return n

    def _on_failure(self, exc: BaseException) -> None:
        self._close_body()
        if self.closed:  # the consumer went away; its close() broke this read
            raise ShardReadError(f"{self.url}: stream closed")
        if _is_fatal(exc):
            raise DataError(f"cannot read {self.url}: {_describe(exc)}") from None
        if not _is_transient(exc):
            raise ShardReadError(f"{self.url}: {_describe(exc)}") from exc
        self._failures += 1
        if self._failures >= self._policy.attempts:
            raise ShardReadError(f"{self.url}: still failing after {self._failures} attempts "
                                 f"at byte {self._pos}: {_describe(exc)}") from exc
        self._health.check(self.url, exc)
        self._counters.add("retries")
        log.info("retrying %s at byte %d after %s", self.url, self._pos, _describe(exc))
        time.sleep(self._policy.delay(self._failures))

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # a broken connection may fail to close; it is gone anyway
                pass

    def close(self) -> None:
        self._close_body()
        super().close()


def _s3_opener(url: str, endpoint_url: str | None, counters: _Counters, policy: RetryPolicy
               ) -> Callable[[int, str | None], tuple[Any, int | None, str | None]]:
    bucket, key = _split_s3(url)
    client = s3_client(endpoint_url, policy)

    def open_at(offset: int, etag: str | None) -> tuple[Any, int | None, str | None]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        if etag:
            kwargs["IfMatch"] = etag  # never splice two versions of an object
        resp = _call_s3(counters, client.get_object, **kwargs)
        return resp["Body"], offset + int(resp["ContentLength"]), resp.get("ETag")

    return open_at


def _http_opener(url: str, policy: RetryPolicy
                 ) -> Callable[[int, str | None], tuple[Any, int | None, str | None]]:
    def open_at(offset: int, etag: str | None) -> tuple[Any, int | None, str | None]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if etag and offset:
            headers["If-Match"] = etag
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=policy.read_timeout)
        length = resp.headers.get("Content-Length")
        if offset and resp.status == 200:  # server ignored Range: skip what we already have
            remaining = offset
            while remaining:
                chunk = resp.read(min(remaining, READ_CHUNK))
                if not chunk:
                    raise _ShortRead(f"body ended before byte {offset}")
                remaining -= len(chunk)
            total = int(length) if length is not None else None
        else:
            total = offset + int(length) if length is not None else None
        return resp, total, resp.headers.get("ETag")

    return open_at


class _ReadAhead(io.RawIOBase):
    """Reads `src` in a background thread, `depth` chunks ahead of the consumer.

    Why: socket reads release the GIL, so the network (and the S3 server's latency) overlaps
    PNG decoding in the consumer thread; starting the thread before the consumer needs the shard
    also hides the request latency of the next shard. Errors are re-raised in the consumer.
    """

    _EOF = object()

    def __init__(self, src: io.RawIOBase, chunk: int = READ_CHUNK,
                 depth: int = READ_AHEAD_CHUNKS) -> None:
        super().__init__()
        self._src = src
        self._chunk = chunk
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._buf: memoryview = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="sagan-readahead", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                buf = bytearray(self._chunk)
                view = memoryview(buf)
                filled = 0
                while filled < self._chunk:  # fill whole chunks: fewer queue handoffs
                    n = self._src.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
                if filled and not self._put(view[:filled]):  # hand over, no copy
                    return
                if filled < self._chunk:
                    self._put(self._EOF)
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._put(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            if self._done:
                return 0
            item = self._q.get()
            if item is self._EOF:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buf = item
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=2.0)
            self._src.close()
        super().close()


def open_url(url: str, *, endpoint_url: str | None = None, counters: _Counters | None = None,
             policy: RetryPolicy = DEFAULT_RETRY, health: _Health | None = None,
             read_ahead: bool = True) -> IO[bytes]:
    """Open a local path, ``file://``, ``s3://`` or ``http(s)://`` URL for streaming reads.

    Remote streams resume after transient failures (see module docstring); local files are
    plain buffered files.
    """
    counters = counters or _DEFAULT_COUNTERS
    health = health or _Health(policy)
    scheme = _scheme(url)
    if scheme in ("", "file"):
        return open(_local_path(url), "rb", buffering=READ_CHUNK)  # noqa: SIM115 - returned
    if scheme == "s3":
        raw: io.RawIOBase = _ResumableStream(
            url, _s3_opener(url, endpoint_url, counters, policy), counters, policy, health)
    elif scheme in ("http", "https"):
        raw = _ResumableStream(url, _http_opener(url, policy), counters, policy, health)
    else:
        raise DataError(f"unsupported URL scheme in '{url}' (use a path, s3:// or http(s)://)")
    if read_ahead:
        return io.BufferedReader(_ReadAhead(raw), buffer_size=64 * 1024)
    return io.BufferedReader(raw, buffer_size=READ_CHUNK)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset ``gopen`` handler for ``s3://`` (registered on import of this module), so
    ``wds.WebDataset("s3://bucket/train-{000000..000009}.tar")`` streams in-process too.
    Keywords: endpoint_url, counters, policy, health (all optional)."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported by the s3 opener (mode {mode!r})")
    return open_url(url, endpoint_url=kw.get("endpoint_url"), counters=kw.get("counters"),
                    policy=kw.get("policy") or DEFAULT_RETRY, health=kw.get("health"))


wds.gopen_schemes["s3"] = gopen_s3  # the same dict webdataset.gopen.gopen() dispatches on


def read_bytes(url: str, endpoint_url: str | None = None,
               policy: RetryPolicy = DEFAULT_RETRY, counters: _Counters | None = None) -> bytes:
    """Whole small object (the manifest) with the same retry rules; DataError if missing."""
    try:
        with open_url(url, endpoint_url=endpoint_url, policy=policy, counters=counters,
                      read_ahead=False) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"not found: {url}") from None
    except ShardReadError as exc:
        raise DataError(f"cannot read {exc}") from None


# --------------------------------------------------------------------------- manifest


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
        return _join(self.location, shard_name)

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
        where = _join(location, MANIFEST_NAME) if location else MANIFEST_NAME

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
    if _scheme(path) in ("", "file"):
        path = os.path.abspath(_local_path(path))  # loader workers may run in another cwd
    endpoint = resolve_endpoint(endpoint_url) if _scheme(path) == "s3" else None
    url = _join(path, MANIFEST_NAME)
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


# --------------------------------------------------------------------------- shard -> samples


def _split_member(name: str) -> tuple[str, str] | None:
    """'dir/0001.png' -> ('dir/0001', 'png'), as webdataset groups members into samples."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class TarFormatError(ValueError):
    """The shard is not a (complete) tar archive."""


def _read_exact(f: IO[bytes], n: int) -> bytes:
    """n bytes, or b"" at a clean EOF; a partial read is a truncated archive."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            raise TarFormatError(f"unexpected end of data ({got} of {n} bytes)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _tar_number(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _tar_members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream.

    A minimal ustar/pax/GNU reader instead of ``tarfile``: ~4x less CPU per member (it sits on
    the hot path of every sample), and a truncated archive is always an error: ``tarfile``'s
    stream mode silently stops at a torn header, which would hide lost samples.
    """
    long_name: str | None = None
    while True:
        hdr = _read_exact(f, _BLOCK)
        if not hdr:
            raise TarFormatError("archive ends without the end-of-archive marker (truncated)")
        if hdr == _ZERO_BLOCK:
            return
        try:
            checksum = _tar_number(hdr[148:156])
            size = _tar_number(hdr[124:136])
        except ValueError:
            raise TarFormatError("invalid tar header") from None
        if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("tar header checksum mismatch (not a tar, or corrupt)")
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        data = _read_exact(f, size)
        if len(data) != size or len(_read_exact(f, -size % _BLOCK)) != -size % _BLOCK:
            raise TarFormatError(f"unexpected end of data in member {name[:100]!r}")
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header: only 'path' matters to us
            for rec in data.split(b"\n"):
                key, _, value = rec.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = value.decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name.decode("utf-8", "replace"), data
            long_name = None
        else:  # directories, links, global pax headers: not samples
            long_name = None


def _tar_samples(stream: IO[bytes], on_torn: Callable[[str], None] | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Group tar members into samples by key, in order, as webdataset does.

    A sample is only yielded once its key is complete (the next key starts, or the archive ends
    cleanly). If the archive breaks mid-sample, that torn sample is reported to `on_torn` and
    dropped, and the error propagates, so a break is seen as one error, never as a half sample.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(stream):
            parts = _split_member(name)
            if parts is None or name.rsplit("/", 1)[-1].startswith("__"):
                continue
            key, ext = parts
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    except Exception:  # not GeneratorExit: a consumer stopping early tears nothing
        if current is not None and on_torn is not None:
            on_torn(current["__key__"])
        raise
    if current is not None:
        yield current


def _decode(sample: dict[str, Any], m: Manifest) -> tuple[np.ndarray, int | None] | str:
    """(uint8 HxW or HxWx3 array, label) or the reason the sample is rejected."""
    png = sample.get("png")
    if png is None:
        return "no png member"
    try:
        with Image.open(io.BytesIO(png)) as im:
            if im.format != "PNG":
                return f"not a PNG ({im.format})"
            want_mode = "L" if m.channels == 1 else "RGB"
            if im.size != (m.image_size, m.image_size) or im.mode != want_mode:
                return (f"image {im.size[0]}x{im.size[1]} {im.mode}, expected "
                        f"{m.image_size}x{m.image_size} {want_mode}")
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"undecodable PNG ({type(exc).__name__})"
    label: int | None = None
    if m.num_classes:
        raw = sample.get("cls")
        if raw is None:
            return "missing label (cls) in a conditional dataset"
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return f"invalid label {raw[:20]!r}"
        if not 0 <= label < m.num_classes:
            return f"label {label} outside [0, {m.num_classes})"
    return arr, label


@dataclass
class _StreamCtx:
    """Everything one stream (one process or loader worker) needs to read shards."""

    manifest: Manifest
    endpoint_url: str | None
    verify_sha256: bool
    policy: RetryPolicy
    counters: _Counters = field(default_factory=_Counters)
    health: _Health | None = None
    warned: int = 0
    last_error: str = ""  # of the latest skipped shard, for the final "nothing readable" error

    def __post_init__(self) -> None:
        self.health = self.health or _Health(self.policy)

    def open(self, shard: ShardInfo) -> IO[bytes]:
        try:
            return open_url(self.manifest.url(shard.name), endpoint_url=self.endpoint_url,
                            counters=self.counters, policy=self.policy, health=self.health)
        except OSError as exc:  # local file missing/unreadable: fail when read, like remotes
            return _FailedStream(exc)

    def warn_sample(self, key: str, shard: ShardInfo, reason: str) -> None:
        self.warned += 1
        if self.warned <= MAX_SAMPLE_WARNINGS:
            log.warning("skipping sample %s in %s: %s%s", key, shard.name, reason,
                        " (further sample warnings suppressed)"
                        if self.warned == MAX_SAMPLE_WARNINGS else "")


class _FailedStream(io.RawIOBase):
    """Stands in for a shard that could not even be opened; raises its error on first read."""

    def __init__(self, exc: OSError) -> None:
        super().__init__()
        self._exc = exc

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        raise self._exc


def _shard_samples(ctx: _StreamCtx, shard: ShardInfo, stream: IO[bytes]
                   ) -> Iterator[tuple[np.ndarray, int | None, str]]:
    """Decoded samples of one shard; rejects and failures are counted, never raised (except
    DataError, which means the whole stream must stop)."""
    read = 0
    try:
        with stream:
            source: IO[bytes] = stream
            if ctx.verify_sha256:
                # Verification must precede delivery, so the shard is buffered in memory
                # (never on disk); costs one shard of RAM per stream.
                blob = stream.read()
                digest = hashlib.sha256(blob).hexdigest()
                if digest != shard.sha256:
                    raise ShardReadError(f"sha256 mismatch ({digest[:12]}..., manifest says "
                                         f"{shard.sha256[:12]}...)")
                source = io.BytesIO(blob)
            def torn(key: str) -> None:
                ctx.counters.add("skipped_samples")
                ctx.warn_sample(key, shard, "torn by the shard error below")

            for sample in _tar_samples(source, torn):
                read += 1
                out = _decode(sample, ctx.manifest)
                if isinstance(out, str):
                    ctx.counters.add("skipped_samples")
                    ctx.warn_sample(sample["__key__"], shard, out)
                    continue
                yield out[0], out[1], sample["__key__"]
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as exc:  # TarFormatError is a ValueError
        ctx.counters.add("skipped_shards")
        # ShardReadError messages already name the URL and the cause
        reason = str(exc) if isinstance(exc, ShardReadError) else _describe(exc)
        ctx.last_error = reason if isinstance(exc, ShardReadError) else f"{shard.name}: {reason}"
        log.warning("skipping rest of shard %s after %d samples: %s", shard.name, read, reason)
        return
    if read < shard.samples:
        ctx.counters.add("skipped_shards")
        ctx.last_error = f"{shard.name}: ended after {read} of {shard.samples} samples"
        log.warning("shard %s ended after %d of %d samples (truncated?); counted as skipped",
                    shard.name, read, shard.samples)


def _prefetched(ctx: _StreamCtx, shards: Iterable[ShardInfo]
                ) -> Iterator[tuple[ShardInfo, IO[bytes]]]:
    """Open each shard one step ahead, so its request and first bytes are in flight while the
    previous shard is being decoded."""
    it = iter(shards)
    pending: tuple[ShardInfo, IO[bytes]] | None = None
    try:
        for shard in it:
            nxt = (shard, ctx.open(shard))
            if pending is not None:
                yield pending
            pending = nxt
        if pending is not None:
            p, pending = pending, None
            yield p
    finally:
        if pending is not None:
            pending[1].close()


def _collate(items: list[tuple[np.ndarray, int | None, str]], conditional: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """uint8 arrays -> float32 (B, C, S, S) in [-1, 1]; labels -> int64 (B,) or None."""
    arr = np.stack([a for a, _, _ in items])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    # numpy, not torch ops: torch's intra-op thread pool thrashes on a busy small CPU box
    # (measured 35 ms vs 0.1 ms per 256x32x32 batch at load 6 on 2 cores).
    xf = np.ascontiguousarray(arr, dtype=np.float32)
    xf /= np.float32(127.5)
    xf -= np.float32(1.0)
    x = torch.from_numpy(xf)
    y = torch.tensor([lab for _, lab, _ in items], dtype=torch.int64) if conditional else None
    return x, y, [k for _, _, k in items]


# --------------------------------------------------------------------------- training stream


def _assign_rank_shards(shards: list[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    """Disjoint round-robin split by rank. With fewer shards than ranks, rank r reads shard
    r mod n (ranks then share shards, with a warning) rather than getting none and hanging DDP."""
    if len(shards) >= world_size:
        return shards[rank::world_size]
    log.warning("only %d shard(s) for %d ranks: ranks will share shards; write more shards "
                "(prepare_data --samples-per-shard) for disjoint per-rank data",
                len(shards), world_size)
    return [shards[rank % len(shards)]]


class _TrainStream(torch.utils.data.IterableDataset):
    """Infinite batch stream of one rank; runs in each DataLoader worker (picklable state)."""

    def __init__(self, manifest: Manifest, shards: list[ShardInfo], batch_size: int,
                 shuffle_buffer: int, hflip: bool, verify_sha256: bool, seed: int, rank: int,
                 endpoint_url: str | None, policy: RetryPolicy) -> None:
        super().__init__()
        self.manifest, self.shards, self.batch_size = manifest, shards, batch_size
        self.shuffle_buffer, self.hflip, self.verify_sha256 = shuffle_buffer, hflip, verify_sha256
        self.seed, self.rank, self.endpoint_url, self.policy = seed, rank, endpoint_url, policy

    def worker_shards(self, worker: int, num_workers: int) -> list[ShardInfo]:
        """split_by_worker when every worker can get one; otherwise each worker resamples all
        of the rank's shards (with its own seed) instead of idling."""
        if len(self.shards) >= num_workers:
            return self.shards[worker::num_workers]
        return list(self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.worker_shards(worker, num_workers)
        ctx = _StreamCtx(self.manifest, self.endpoint_url, self.verify_sha256, self.policy)
        rng = random.Random(f"sagan-data/{self.seed}/{self.rank}/{worker}")
        try:
            samples = self._samples(ctx, shards, rng)
            if self.shuffle_buffer > 1:
                samples = wds.filters._shuffle(samples, bufsize=self.shuffle_buffer,
                                               initial=min(self.shuffle_buffer, 100), rng=rng)
            buf: list[tuple[np.ndarray, int | None, str]] = []
            for arr, label, key in samples:
                if self.hflip and rng.random() < 0.5:
                    arr = arr[:, ::-1]
                buf.append((arr, label, key))
                if len(buf) == self.batch_size:
                    x, y, _ = _collate(buf, self.manifest.conditional)
                    buf = []
                    yield {"x": x, "y": y, "delta": ctx.counters.take_delta()}
        except DataError as exc:  # in-band, so the main process gets one clean line
            yield {"error": str(exc), "delta": ctx.counters.take_delta()}

    def _samples(self, ctx: _StreamCtx, shards: list[ShardInfo], rng: random.Random
                 ) -> Iterator[tuple[np.ndarray, int | None, str]]:
        """Resampled shards -> decoded samples. Stops with DataError once every distinct shard
        of this worker has come up empty (failed or only corrupt samples) since the last good
        sample: nothing readable remains, and an infinite loop of skips would hang training."""
        def draws() -> Iterator[ShardInfo]:
            while True:
                yield rng.choice(shards)

        empty_since_good: set[str] = set()
        for shard, stream in _prefetched(ctx, draws()):
            good = 0
            for sample in _shard_samples(ctx, shard, stream):
                good += 1
                yield sample
            if good:
                empty_since_good.clear()
                continue
            empty_since_good.add(shard.name)
            if len(empty_since_good) == len(shards):
                raise DataError(
                    f"no readable samples in {len(shards)} shard(s) of {ctx.manifest.location} "
                    f"(skipped {ctx.counters.get('skipped_shards')} shard reads, "
                    f"{ctx.counters.get('skipped_samples')} samples; last error: "
                    f"{ctx.last_error or 'all samples corrupt'})")


class TrainLoader:
    """Exactly ``batches_per_epoch`` batches per ``iter()`` on every rank, from one persistent
    resampled stream: epoch e+1 continues where epoch e stopped (workers, shuffle buffer and
    shard RNG stay alive), instead of restarting workers with the same seeds and replaying the
    same data, which is what re-iterating a ``WebLoader.with_epoch`` would do.

    Yields ``(x, y)``: float32 (B, C, S, S) in [-1, 1]; int64 (B,) or None (unconditional).
    """

    def __init__(self, stream: _TrainStream, batches_per_epoch: int, loader_workers: int,
                 world_size: int) -> None:
        self.dataset = stream
        self.manifest = stream.manifest
        self.batch_size = stream.batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = stream.rank, world_size
        self.loader_workers = loader_workers
        self.epoch = 0
        self._stats = DataStats()
        self._loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=loader_workers,
            prefetch_factor=4 if loader_workers else None)
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def stats(self) -> DataStats:
        """Counts so far, accumulated in this (the main) process; a snapshot copy."""
        return dataclasses.replace(self._stats)

    @property
    def shards(self) -> list[ShardInfo]:
        """This rank's shards."""
        return list(self.dataset.shards)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self._it is None:
            self._it = iter(self._loader)
        for _ in range(self.batches_per_epoch):
            try:
                item = next(self._it)
            except StopIteration:
                self.close()
                raise DataError("training stream ended unexpectedly") from None
            sk_samples, sk_shards, retries = (int(v) for v in item["delta"])
            self._stats.skipped_samples += sk_samples
            self._stats.skipped_shards += sk_shards
            self._stats.retries += retries
            if "error" in item:
                self.close()
                raise DataError(item["error"])
            self._stats.samples += int(item["x"].shape[0])
            yield item["x"], item["y"]
        self.epoch += 1

    def close(self) -> None:
        """Stop the loader workers (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: workers are going away anyway
            pass


def _manifest_for(cfg_or_path: Any, endpoint_url: str | None, manifest: Manifest | None,
                  policy: RetryPolicy) -> Manifest:
    if manifest is not None:
        return manifest
    if isinstance(cfg_or_path, Manifest):
        return cfg_or_path
    path = getattr(cfg_or_path, "path", cfg_or_path)
    endpoint = endpoint_url or getattr(cfg_or_path, "endpoint_url", None)
    try:
        return load_manifest(str(path), endpoint, policy)
    except DataError as exc:
        if getattr(cfg_or_path, "prepare_source", None) and "no manifest.json" in str(exc):
            raise DataError(f"{exc}; data.prepare_source is set: call "
                            "sagan.datasets.ensure_dataset(cfg.data, image_size, channels) "
                            "first") from None
        raise


def train_loader(data_cfg: Any, batch_size: int, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None, seed: int = 0,
                 manifest: Manifest | None = None, *, retry: RetryPolicy | None = None
                 ) -> TrainLoader:
    """Training stream for one rank (see :class:`TrainLoader`).

    ``data_cfg`` is a ``sagan.config.DataConfig`` (path, endpoint_url, shuffle_buffer, hflip,
    loader_workers, verify_sha256). ``batch_size`` is per rank. ``batches_per_epoch`` defaults
    to one pass worth of data: total // (batch_size * world_size), at least 1.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    policy = retry or DEFAULT_RETRY
    m = _manifest_for(data_cfg, None, manifest, policy)
    shards = [s for s in m.shards if s.samples > 0]
    if not shards:
        raise DataError(f"dataset {m.location} has no samples (manifest lists "
                        f"{len(m.shards)} shard(s), total {m.total})")
    if batches_per_epoch is None:
        batches_per_epoch = max(1, m.total // (batch_size * world_size))
    if batches_per_epoch <= 0:
        raise DataError(f"batches_per_epoch must be > 0, got {batches_per_epoch}")
    endpoint = resolve_endpoint(getattr(data_cfg, "endpoint_url", None) or m.endpoint_url) \
        if _scheme(m.location) == "s3" else None
    stream = _TrainStream(
        m, _assign_rank_shards(shards, rank, world_size), batch_size,
        shuffle_buffer=int(getattr(data_cfg, "shuffle_buffer", 1000)),
        hflip=bool(getattr(data_cfg, "hflip", False)),
        verify_sha256=bool(getattr(data_cfg, "verify_sha256", False)),
        seed=seed, rank=rank, endpoint_url=endpoint, policy=policy)
    return TrainLoader(stream, batches_per_epoch, int(getattr(data_cfg, "loader_workers", 0)),
                       world_size)


# --------------------------------------------------------------------------- single pass


class EvalLoader:
    """One deterministic pass per ``iter()``: every sample exactly once, shards in manifest
    order, no shuffle, no resampling, last batch possibly short. Runs in the calling process
    (read-ahead threads do the I/O), so the order never depends on worker scheduling.
    ``stats`` describes the latest pass."""

    def __init__(self, manifest: Manifest, batch_size: int, limit: int | None,
                 endpoint_url: str | None, verify_sha256: bool, with_keys: bool,
                 policy: RetryPolicy) -> None:
        self.manifest, self.batch_size, self.limit = manifest, batch_size, limit
        self.endpoint_url, self.verify_sha256, self.with_keys = endpoint_url, verify_sha256, \
            with_keys
        self.policy = policy
        self._stats = DataStats()

    @property
    def stats(self) -> DataStats:
        return dataclasses.replace(self._stats)

    @property
    def num_samples(self) -> int:
        """Samples a clean pass delivers (fewer if some are corrupt)."""
        n = self.manifest.total
        return n if self.limit is None else min(n, self.limit)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self._stats = DataStats()
        ctx = _StreamCtx(self.manifest, self.endpoint_url, self.verify_sha256, self.policy)
        cond = self.manifest.conditional
        budget = self.num_samples
        buf: list[tuple[np.ndarray, int | None, str]] = []

        def emit() -> tuple[Any, ...]:
            x, y, keys = _collate(buf, cond)
            self._stats.samples += len(buf)
            buf.clear()
            return (x, y, keys) if self.with_keys else (x, y)

        def sync() -> None:
            self._stats.skipped_samples = ctx.counters.get("skipped_samples")
            self._stats.skipped_shards = ctx.counters.get("skipped_shards")
            self._stats.retries = ctx.counters.get("retries")

        shards = [s for s in self.manifest.shards if s.samples > 0]
        gen = _prefetched(ctx, shards)
        try:
            for shard, stream in gen:
                for sample in _shard_samples(ctx, shard, stream):
                    buf.append(sample)
                    budget -= 1
                    if len(buf) == self.batch_size:
                        sync()
                        yield emit()
                    if budget == 0:
                        break
                if budget == 0:
                    break
        finally:
            gen.close()
            sync()
        if buf:
            yield emit()
        sync()
        if self._stats.samples == 0 and shards:
            raise DataError(
                f"no readable samples in {self.manifest.location}: skipped "
                f"{self._stats.skipped_shards} of {len(shards)} shards and "
                f"{self._stats.skipped_samples} samples (last error: "
                f"{ctx.last_error or 'all samples corrupt'})")


def eval_loader(path_or_cfg: Any, batch_size: int, limit: int | None = None,
                endpoint_url: str | None = None, *, manifest: Manifest | None = None,
                verify_sha256: bool | None = None, with_keys: bool = False,
                retry: RetryPolicy | None = None) -> EvalLoader:
    """Single deterministic pass (see :class:`EvalLoader`) over a path, DataConfig or Manifest.

    Yields ``(x, y)``, or ``(x, y, keys)`` with ``with_keys=True`` (sample keys, for tracing
    a sample back to its source).
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be > 0 or None, got {limit}")
    policy = retry or DEFAULT_RETRY
    m = _manifest_for(path_or_cfg, endpoint_url, manifest, policy)
    if verify_sha256 is None:
        verify_sha256 = bool(getattr(path_or_cfg, "verify_sha256", False))
    endpoint = resolve_endpoint(endpoint_url or getattr(path_or_cfg, "endpoint_url", None)
                                or m.endpoint_url) if _scheme(m.location) == "s3" else None
    return EvalLoader(m, batch_size, limit, endpoint, verify_sha256, with_keys, policy)


# --------------------------------------------------------------------------- writing


class _Destination:
    """Where finished shards and the manifest go: a local directory or an S3 prefix."""

    def __init__(self, out: str, endpoint_url: str | None) -> None:
        self.out = str(out).rstrip("/")
        scheme = _scheme(self.out)
        if scheme in ("http", "https"):
            raise DataError(f"cannot write to {out}: http(s) is read-only; use a local "
                            "directory or s3://bucket/prefix")
        self.s3 = scheme == "s3"
        if self.s3:
            self.bucket, self.prefix = _split_s3(self.out)
            self.endpoint_url = resolve_endpoint(endpoint_url)
            self.client = s3_client(self.endpoint_url)
            self._check_bucket()
        else:
            self.out = os.path.abspath(_local_path(self.out))
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
            raise DataError(f"cannot write to s3://{self.bucket}: {_describe(exc)}") from None
        except bexc.BotoCoreError as exc:
            raise DataError(f"cannot reach S3 for s3://{self.bucket} "
                            f"(endpoint {self.endpoint_url or 'AWS'}): {_describe(exc)}") from None

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
            raise DataError(f"cannot {what} in {self.out}: {_describe(exc)}") from None

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
    """
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

    dest = _Destination(out, endpoint_url)
    dest.delete(MANIFEST_NAME)
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
        it = iter(samples_iterable)
        index = -1
        for index, item in enumerate(it):
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
                                         post=finished, verbose=0, encoder=False, mtime=0,
                                         user="sagan", group="sagan")
            writer.write(sample)
        if writer is None:
            raise DataError(f"no samples to write to {out}")
        writer.close()
        writer = None
    finally:
        if writer is not None and getattr(writer, "tarstream", None) is not None:
            try:  # failed mid-shard: close the open temp shard, never publish it
                writer.tarstream.close()
            except Exception:  # noqa: BLE001 - already failing; the original error matters
                pass
        shutil.rmtree(tmp, ignore_errors=True)

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
