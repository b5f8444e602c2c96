"""Where bytes come from: local paths, ``s3://`` (boto3, in-process) and ``http(s)://``.

Streams are read ahead, resume a broken connection where it broke (``Range`` + ``If-Match``, so
every byte reaches the parser exactly once), and retry transient errors within bounds
(:class:`RetryPolicy`). Details: docs/DATA.md ("Design notes").
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import IO, Any

import webdataset as wds

from sagan.errors import one_line

from .errors import (
    DEFAULT_RETRY,
    Counters,
    DataError,
    Health,
    RetryPolicy,
    ShardReadError,
    ShortRead,
    is_fatal,
    is_transient,
    is_unreachable,
)
from .readahead import READ_CHUNK, ReadAhead

log = logging.getLogger(__name__)


Opener = Callable[[int, str | None], tuple[Any, int | None, str | None]]

_DEFAULT_COUNTERS = Counters()  # for plain webdataset users of gopen("s3://...")


# --------------------------------------------------------------------------- locations


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """Config value first, then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``; None = AWS."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def scheme(path: str) -> str:
    p = path.split("://", 1)
    return p[0].lower() if len(p) == 2 else ""


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"invalid S3 URL '{url}': expected s3://bucket/prefix")
    return bucket, key


def join(prefix: str, name: str) -> str:
    if scheme(prefix) in ("s3", "http", "https"):
        return prefix.rstrip("/") + "/" + name
    if scheme(prefix) == "file":
        prefix = urllib.parse.urlparse(prefix).path
    return os.path.join(prefix, name)


def local_path(path: str) -> str:
    if scheme(path) == "file":
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


def _call_s3(counters: Counters, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one boto3 call, adding botocore's internal re-attempts to ``counters.retries``."""
    _TLS.attempts = 0
    try:
        return fn(**kwargs)
    finally:
        counters.add("retries", max(0, getattr(_TLS, "attempts", 0) - 1))


# --------------------------------------------------------------------------- readers


class _ResumableStream(io.RawIOBase):
    """A remote object as a forward-only byte stream that survives broken connections.

    `open_at(offset, etag)` returns (body, total_size_or_None, etag); on a transient failure the
    body is re-opened at the number of bytes already returned, so the consumer sees one
    uninterrupted stream. Opening is lazy (first read), so a read-ahead thread does it.
    """

    def __init__(self, url: str, open_at: Opener, counters: Counters, policy: RetryPolicy,
                 health: Health) -> None:
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
                    raise ShortRead(f"body ended at byte {self._pos} of {self._size}")
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
        if is_fatal(exc):
            raise DataError(f"cannot read {self.url}: {one_line(exc, with_type=True)}") from None
        if not is_transient(exc):
            raise ShardReadError(f"{self.url}: {one_line(exc, with_type=True)}") from exc
        if is_unreachable(exc):  # the whole endpoint is down: wait, skip nothing
            self._health.check(self.url, exc)
            self._health.waiting(self.url)
            self._counters.add("retries")
            time.sleep(self._policy.delay(self._policy.attempts))
            return
        self._failures += 1
        if self._failures >= self._policy.attempts:
            raise ShardReadError(f"{self.url}: still failing after {self._failures} attempts "
                                 f"at byte {self._pos}: {one_line(exc, with_type=True)}") from exc
        self._health.check(self.url, exc)
        self._counters.add("retries")
        log.info("retrying %s at byte %d after %s", self.url, self._pos,
                 one_line(exc, with_type=True))
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


def _s3_opener(url: str, endpoint_url: str | None, counters: Counters,
               policy: RetryPolicy) -> Opener:
    bucket, key = split_s3(url)
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


def _http_opener(url: str, policy: RetryPolicy) -> Opener:
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
                    raise ShortRead(f"body ended before byte {offset}")
                remaining -= len(chunk)
            total = int(length) if length is not None else None
        else:
            total = offset + int(length) if length is not None else None
        return resp, total, resp.headers.get("ETag")

    return open_at


def open_url(url: str, *, endpoint_url: str | None = None, counters: Counters | None = None,
             policy: RetryPolicy = DEFAULT_RETRY, health: Health | None = None,
             read_ahead: bool = True) -> IO[bytes]:
    """Open a local path, ``file://``, ``s3://`` or ``http(s)://`` URL for streaming reads.

    Remote streams resume after transient failures (see module docstring); local files are
    plain buffered files.
    """
    counters = counters or _DEFAULT_COUNTERS
    health = health or Health(policy)
    kind = scheme(url)
    if kind in ("", "file"):
        return open(local_path(url), "rb", buffering=READ_CHUNK)  # noqa: SIM115 - returned
    if kind == "s3":
        raw: io.RawIOBase = _ResumableStream(
            url, _s3_opener(url, endpoint_url, counters, policy), counters, policy, health)
    elif kind in ("http", "https"):
        raw = _ResumableStream(url, _http_opener(url, policy), counters, policy, health)
    else:
        raise DataError(f"unsupported URL scheme in '{url}' (use a path, s3:// or http(s)://)")
    if read_ahead:
        return io.BufferedReader(ReadAhead(raw), buffer_size=64 * 1024)
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
               policy: RetryPolicy = DEFAULT_RETRY, counters: Counters | None = None) -> bytes:
    """Whole small object (the manifest) with the same retry rules; DataError if missing."""
    try:
        with open_url(url, endpoint_url=endpoint_url, policy=policy, counters=counters,
                      read_ahead=False) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"not found: {url}") from None
    except ShardReadError as exc:
        raise DataError(f"cannot read {exc}") from None
