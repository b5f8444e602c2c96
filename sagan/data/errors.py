"""What can go wrong while reading data, how it is counted, and how hard to retry.

Everything here is shared by the storage layer (which retries and counts retries) and the
pipeline (which skips and counts shards and samples); nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import logging
import random
import socket
import threading
import time
import urllib.error
from dataclasses import dataclass

from sagan.errors import one_line

log = logging.getLogger(__name__)


class _FixedMessage:
    """An exception whose ``str()`` is the message it was raised with.

    webdataset appends context (``" @ <stream>"``, the stream and the URL) to ``exc.args`` as an
    exception passes through its stages; our messages must stay one clean line regardless.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DataError(_FixedMessage, RuntimeError):
    """The data cannot be read or written; the message is one line naming the file or field."""


class StorageUnreachable(DataError):
    """Nothing on a stream succeeded for ``RetryPolicy.max_outage_s``: unlike the other DataErrors
    (no manifest, bad credentials, invalid data), the same read may well work a minute later."""


class ShardReadError(_FixedMessage, OSError):
    """One shard cannot be read (after retries); the stream skips it and counts it."""


# --------------------------------------------------------------------------- counters


@dataclass
class DataStats:
    """Counts a training job logs. ``samples``: delivered in batches; ``skipped_samples``: read but
    rejected (undecodable PNG, wrong size/mode, missing/invalid label, torn by a shard error);
    ``skipped_shards``: shard reads that did not complete (unreadable after retries, not a tar,
    truncated, fewer samples than the manifest lists, sha256 mismatch; samples read before the
    break are still delivered, once); ``retries``: request re-attempts, botocore's and ours."""

    skipped_samples: int = 0
    skipped_shards: int = 0
    retries: int = 0
    samples: int = 0

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Flat dict for metric logging."""
        return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


class Counters:
    """Monotonic, thread-safe counters of one stream (read-ahead threads count retries while the
    consumer counts skipped samples, so plain ``+=`` could lose updates)."""

    FIELDS = ("skipped_samples", "skipped_shards", "retries")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._values[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> tuple[int, int, int]:
        """(skipped_samples, skipped_shards, retries) so far: small and picklable, so it can
        ride along a sample and a batch to the main process."""
        with self._lock:
            return tuple(self._values[k] for k in self.FIELDS)  # type: ignore[return-value]


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


class Health:
    """Time since anything last succeeded on this stream: the 'never hang' clock."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.last_ok = time.monotonic()
        self._noted = 0  # minutes of the current outage already reported

    def ok(self) -> None:
        self.last_ok = time.monotonic()
        self._noted = 0

    def waiting(self, where: str) -> None:
        """One line a minute while the endpoint stays unreachable (training is paused)."""
        idle = time.monotonic() - self.last_ok
        if idle >= 60 * (self._noted + 1):
            self._noted = int(idle // 60)
            log.warning("storage unreachable for %.0f s while reading %s; waiting for it "
                        "(gives up after data.max_outage_s=%.0f s)", idle, where,
                        self.policy.max_outage_s)

    def check(self, where: str, exc: BaseException) -> None:
        idle = time.monotonic() - self.last_ok
        if idle > self.policy.max_outage_s:
            raise StorageUnreachable(f"storage unreachable for {idle:.0f}s while reading {where}: "
                            f"{one_line(exc, with_type=True)}")


# --------------------------------------------------------------------------- error taxonomy

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestLimitExceeded", "TooManyRequests", "InternalError",
                   "ServiceUnavailable", "RequestThrottled"}
_FATAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                "AllAccessDisabled", "InvalidBucketName", "ExpiredToken", "InvalidToken"}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


class ShortRead(OSError):
    """The server closed the body before Content-Length bytes arrived."""


def _client_error_info(exc: BaseException) -> tuple[int, str]:
    resp = getattr(exc, "response", None) or {}
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(resp.get("Error", {}).get("Code", ""))
    return status, code


def is_transient(exc: BaseException) -> bool:
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
    if isinstance(exc, u3exc.HTTPError | http.client.HTTPException | ShortRead):
        return True
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, OSError | str)
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint as a whole does not answer (refused, unreachable, connect timeout): not the
    object's fault, so it is waited out (bounded by max_outage_s) instead of counted against
    the shard's attempts."""
    import botocore.exceptions as bexc
    import urllib3.exceptions as u3exc

    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectTimeoutError
                  | u3exc.NewConnectionError | u3exc.ConnectTimeoutError
                  | ConnectionRefusedError):
        return True
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, OSError):
        return is_unreachable(exc.reason)
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                                      errno.ENETUNREACH, errno.ENETDOWN)


def is_fatal(exc: BaseException) -> bool:
    """Affects every shard alike (credentials, bucket): stop the stream with a DataError."""
    import botocore.exceptions as bexc

    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return True
    if isinstance(exc, bexc.ClientError):
        status, code = _client_error_info(exc)
        return code in _FATAL_CODES or status == 403
    return isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403)
