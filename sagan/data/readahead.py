"""A stream read in a background thread, a few chunks ahead of its consumer (each open shard)."""

from __future__ import annotations

import io
import queue
import threading
from typing import Any

READ_CHUNK = 1 << 20  # read-ahead chunk: big enough that per-call overhead vanishes
READ_AHEAD_CHUNKS = 8  # per open shard: 8 MiB buffered ahead of the tar parser


def put_until_stopped(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    """Blocking put that gives up (False) once `stop` is set, so a producer thread never hangs
    on a consumer that has gone away."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def stop_producer(q: queue.Queue, stop: threading.Event, thread: threading.Thread,
                  timeout: float) -> None:
    """Stop a producer thread: set `stop`, drop what it queued (so a blocked put returns), join."""
    stop.set()
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    thread.join(timeout=timeout)


class ReadAhead(io.RawIOBase):
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
                # hand over the filled view, no copy
                if filled and not put_until_stopped(self._q, self._stop, view[:filled]):
                    return
                if filled < self._chunk:
                    put_until_stopped(self._q, self._stop, self._EOF)
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put_until_stopped(self._q, self._stop, exc)

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
            stop_producer(self._q, self._stop, self._thread, timeout=2.0)
            self._src.close()
        super().close()
