"""Overlap data loading with compute: a background thread stages the next batches on the
training device (pinned, copied on a side stream on CUDA, in the trainer's memory format) while
the current step runs.

    batches = Prefetcher(loader, device, memory_format=torch.channels_last)
    trainer.train_step(batches)      # batches arrive already on the device, in the right layout
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sagan.data.readahead import put_until_stopped, stop_producer

_DONE = object()


def _move(obj: Any, device: torch.device, memory_format: torch.memory_format | None,
          pin: bool) -> Any:
    """Tensors (nested in tuples/lists/dicts) -> `device`, 4-D ones in `memory_format`."""
    if isinstance(obj, torch.Tensor):
        if pin and obj.device.type == "cpu":
            obj = obj.pin_memory()
        obj = obj.to(device, non_blocking=True)
        if memory_format is not None and obj.dim() == 4:
            obj = obj.contiguous(memory_format=memory_format)
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device, memory_format, pin) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, memory_format, pin) for k, v in obj.items()}
    return obj


def _record_stream(obj: Any, stream: Any) -> None:
    """Tell the CUDA caching allocator the consuming stream uses these tensors."""
    if isinstance(obj, torch.Tensor):
        obj.record_stream(stream)
    elif isinstance(obj, tuple | list):
        for o in obj:
            _record_stream(o, stream)
    elif isinstance(obj, dict):
        for o in obj.values():
            _record_stream(o, stream)


class Prefetcher:
    """Iterator over `batches` with up to `depth` batches fetched and moved to `device` ahead.

    Exceptions raised by the source iterator are re-raised from `__next__` in the consumer, in
    order; exhaustion ends the iteration. `close()` (or leaving a `with` block) stops the
    thread; it is a daemon, so an abandoned prefetcher never blocks interpreter exit.
    """

    def __init__(self, batches: Iterable[Any], device: torch.device | str, depth: int = 2,
                 memory_format: torch.memory_format | None = None,
                 pin_memory: bool | None = None):
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # the worker thread must pin the same GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.memory_format = memory_format
        self.pin = cuda if pin_memory is None else pin_memory
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._source = iter(batches)
        self._finished = False
        self._thread = threading.Thread(target=self._work, name="sagan-prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        if self._stream is not None:
            torch.cuda.set_device(self.device)
        while not self._stop.is_set():
            try:
                batch = next(self._source)
            except StopIteration:
                put_until_stopped(self._queue, self._stop, (_DONE, None, None))
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised
                put_until_stopped(self._queue, self._stop, (_DONE, exc, None))
                return
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        moved = _move(batch, self.device, self.memory_format, self.pin)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                else:
                    moved, event = _move(batch, self.device, self.memory_format, False), None
            except BaseException as exc:  # noqa: BLE001
                put_until_stopped(self._queue, self._stop, (_DONE, exc, None))
                return
            if not put_until_stopped(self._queue, self._stop, (moved, None, event)):
                return

    # ------------------------------------------------------------------ consumer side
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item, exc, event = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._thread.join(timeout=1.0)
            if exc is not None:
                raise exc
            raise StopIteration
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            _record_stream(item, current)
        return item

    def close(self) -> None:
        """Stop the worker thread (pending batches are dropped)."""
        self._finished = True
        stop_producer(self._queue, self._stop, self._thread, timeout=1.0)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
