"""Rank 0's MLflow logging, off the step loop: a bounded queue and one writer thread.

Why not MLflow's own async logging (`log_batch(..., synchronous=False)`): its queue worker calls
the same blocking REST client, so an outage parks it in the HTTP retry loop, and when those
retries run out it sets the exception on the batch's future and drops the batch; the queue is
unbounded and nothing is kept for later. Experiment tracking is a side channel, so here:

- `log_metrics` / `log_image` only append to memory and return; the writer thread sends.
- The writer probes `/health` (2 s timeout) before sending, so it notices an outage without
  entering MLflow's retry loop, and backs off up to 10 s between probes. It prints one line when
  the server goes away, one per minute while it stays away, and one when it is back.
- Scalars are never dropped: past `SPILL_AFTER` in memory they go to a local JSONL file and are
  replayed, with their original steps and timestamps, when the server is back. A replayed batch
  that had in fact arrived is harmless: the server's SQL store skips identical
  (key, value, timestamp, step) points.
- Images are bounded (`tracking.max_queued_images`): when full, the oldest is dropped and
  counted (`dropped_images`, logged with every metrics batch).
- `close(wait_s)` drains for at most `wait_s`, printing "waiting for MLflow at URL (down since
  ...)" once a minute; what is left is spilled, with the command that sends it later.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

SPILL_AFTER = 2000  # scalar points kept in memory before they go to the spill file
BATCH = 1000  # MLflow's log_batch limit on metrics per request
REPORT_EVERY_S = 60.0


def _say(message: str) -> None:
    """One line on the raw stdout (see train_loop._say: Ray tees a wrapped sys.stdout)."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def server_up(uri: str, timeout: float = 2.0) -> bool:
    """True when an HTTP tracking server answers /health (a sqlite/file store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health",  # noqa: S310 - user's URI
                                    timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def wait_for_server(uri: str, timeout_s: float, what: str, say=_say) -> bool:
    """Block until MLflow at `uri` answers, at most `timeout_s`; one "waiting for MLflow" line
    when it first fails and one a minute after. True when it answers."""
    start = time.time()
    next_line = start
    while not server_up(uri):
        now = time.time()
        if now - start >= timeout_s:
            return False
        if now >= next_line:
            say(f"waiting for MLflow at {uri} (down since {_clock(start)}) to {what}; "
                f"giving up after {timeout_s:.0f} s (tracking.wait_s)")
            next_line = now + REPORT_EVERY_S
        time.sleep(min(2.0, max(0.0, timeout_s - (now - start))))
    return True


class TrackingQueue:
    """Logger for one existing run; the step loop never waits on the server (module doc).

    Steps already in the run's history (probed with `probe_metric` once the server answers)
    are not logged again, so a resumed run keeps one continuous, duplicate-free history."""

    def __init__(self, uri: str, run_id: str, spill_dir: str | Path, max_images: int = 64,
                 probe_metric: str = "loss_d", say=_say) -> None:
        self.uri, self.run_id, self.max_images, self._say = uri, run_id, max_images, say
        self.client = MlflowClient(uri)
        self.spill_path = Path(spill_dir) / f"{run_id}.jsonl"
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self.probe_metric = probe_metric
        self.last_logged: int | None = None  # unknown until the server first answers
        self.dropped_images = 0
        self.sent_metrics = self.sent_images = 0
        self.down_since: float | None = None
        self._next_report = 0.0
        self._cond = threading.Condition()
        self._scalars: list[Metric] = []
        self._inflight: list[Metric] = []
        self._replaying: list[Metric] = []
        self._images: deque[tuple[str, int, int, Any]] = deque()
        self._tags: dict[str, str] = {}
        self._closing = self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the step loop's side
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(1000 * time.time())
        values = {**metrics, "dropped_images": float(self.dropped_images)}
        batch = [Metric(k.replace("/", "."), float(v), ts, step)
                 for k, v in values.items() if v == v and abs(v) != float("inf")]
        with self._cond:
            self._scalars.extend(batch)
            if len(self._scalars) > SPILL_AFTER:
                self._spill(self._scalars)
                self._scalars = []
            self._cond.notify()

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image under `key` at `step` (an image chart with a step slider in the UI)."""
        ts = int(1000 * time.time())
        with self._cond:
            self._images.append((key, step, ts, image))
            while len(self._images) > self.max_images:
                self._images.popleft()
                self.dropped_images += 1
            self._cond.notify()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags (e.g. the evaluation protocol), sent by the writer like everything else;
        a tag set again before it was sent is sent once, with its newest value."""
        with self._cond:
            self._tags.update({k: str(v)[:5000] for k, v in tags.items()})
            self._cond.notify()

    def close(self, wait_s: float) -> bool:
        """Send what is queued, waiting at most `wait_s` for the server. True when all is sent;
        otherwise the scalars left are in the spill file and one line says how to send them."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        deadline = time.monotonic() + wait_s
        while self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            if self.down_since is not None:
                self._say(f"waiting for MLflow at {self.uri} (down since "
                          f"{_clock(self.down_since)}) to send {self._counts()}; "
                          f"{left:.0f} s left (tracking.wait_s)")
            self._thread.join(min(REPORT_EVERY_S, left))
        if not self._thread.is_alive():
            return True
        with self._cond:
            self._abandoned = True  # the writer stops: the spill file is the user's now
            self._spill(self._replaying + self._inflight + self._scalars)
            self._scalars = []
            self.dropped_images += len(self._images)
            self._images.clear()
        self._say(f"error: MLflow at {self.uri} still unreachable after {wait_s:.0f} s; "
                  f"{self.dropped_images} images dropped, the metrics are kept in "
                  f"{self.spill_path}; send them later with: python -m pipelines.tracking_queue "
                  f"{self.spill_path} --tracking-uri {self.uri} --run-id {self.run_id}")
        return False

    # ------------------------------------------------------------------ the writer thread
    def _counts(self) -> str:
        spilled = _count_lines(self.spill_path)
        queued = len(self._scalars) + len(self._inflight) + len(self._replaying) + spilled
        return (f"{queued} metric points "
                f"({spilled} spilled to {self.spill_path}), {len(self._images)} images "
                f"({self.dropped_images} dropped)")

    def _pending(self) -> bool:
        return bool(self._scalars or self._images or self._tags or self.spill_path.exists())

    def _spill(self, metrics: list[Metric]) -> None:
        """Append points to the spill file (the caller holds the lock)."""
        if not metrics:
            return
        with self.spill_path.open("a") as fh:
            for m in metrics:
                fh.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._pending() and not self._closing:
                    self._cond.wait()
                if self._abandoned or not self._pending():
                    return
            try:
                if not server_up(self.uri):
                    raise ConnectionError("no answer on /health")
                if self.last_logged is None:
                    history = self.client.get_metric_history(self.run_id, self.probe_metric)
                    self.last_logged = max((m.step for m in history), default=-1)
                self._send_spilled()
                self._send_scalars()
                self._send_tags()
                self._send_image()
            except Exception as exc:  # an outage: keep everything, probe again later
                self._went_down(exc)
                with self._cond:
                    if self._abandoned:
                        return
                    self._cond.wait(delay)
                delay = min(2 * delay, 10.0)
                continue
            delay = 1.0
            self._came_back()

    def _send_spilled(self) -> None:
        """Replay the spill file (taken whole under the lock; put back if sending fails)."""
        with self._cond:
            if not self.spill_path.exists():
                return
            self._replaying = _read_points(self.spill_path)
            self.spill_path.unlink()
        try:
            self._log_batch(self._replaying)
        except Exception:
            with self._cond:
                self._spill(self._replaying)
                self._replaying = []
            raise
        with self._cond:
            self._replaying = []

    def _send_scalars(self) -> None:
        while True:
            with self._cond:
                self._inflight, self._scalars = self._scalars[:BATCH], self._scalars[BATCH:]
                batch = self._inflight
            if not batch:
                return
            try:
                self._log_batch(batch)
            except Exception:
                with self._cond:  # back in front, in order
                    self._scalars = self._inflight + self._scalars
                    self._inflight = []
                raise
            with self._cond:
                self._inflight = []

    def _send_tags(self) -> None:
        with self._cond:
            tags, self._tags = self._tags, {}
        if not tags:
            return
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception:
            with self._cond:  # newer values set meanwhile win
                self._tags = {**tags, **self._tags}
            raise

    def _log_batch(self, points: list[Metric]) -> None:
        points = [m for m in points if m.step > (self.last_logged or -1)]
        for i in range(0, len(points), BATCH):
            self.client.log_batch(self.run_id, metrics=points[i:i + BATCH])
            self.sent_metrics += len(points[i:i + BATCH])

    def _send_image(self) -> None:
        with self._cond:
            if not self._images:
                return
            key, step, ts, image = self._images[0]
        if step > (self.last_logged or -1):
            self.client.log_image(self.run_id, image, key=key, step=step, timestamp=ts)
            self.sent_images += 1
        with self._cond:
            if self._images and self._images[0][:3] == (key, step, ts):
                self._images.popleft()

    def _went_down(self, exc: BaseException) -> None:
        now = time.time()
        if self.down_since is None:
            self.down_since = now
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self._say(f"[mlflow] {self.uri} unreachable ({reason}); training goes on, "
                      f"logging is queued")
            self._next_report = now + REPORT_EVERY_S
        elif now >= self._next_report and not self._closing:
            self._say(f"[mlflow] {self.uri} down since {_clock(self.down_since)}: queued "
                      f"{self._counts()}")
            self._next_report = now + REPORT_EVERY_S

    def _came_back(self) -> None:
        if self.down_since is not None:
            self._say(f"[mlflow] {self.uri} is back after {time.time() - self.down_since:.0f} s;"
                      f" queued logging replayed")
            self.down_since = None


def _read_points(path: Path) -> list[Metric]:
    return [Metric(k, v, ts, step) for k, v, ts, step in
            (json.loads(line) for line in path.read_text().splitlines() if line.strip())]


def _count_lines(path: Path) -> int:
    try:
        with path.open() as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def replay(spill_file: str | Path, uri: str, run_id: str) -> int:
    """Send a spill file's points to `run_id` (original steps and timestamps); returns how
    many. Sending a file twice adds nothing: the server skips identical points."""
    client = MlflowClient(uri)
    points = _read_points(Path(spill_file))
    for i in range(0, len(points), BATCH):
        client.log_batch(run_id, metrics=points[i:i + BATCH])
    return len(points)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Send metrics that a training job kept in a spill "
                                "file while MLflow was unreachable.")
    p.add_argument("spill_file")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    args = p.parse_args(argv)
    if not Path(args.spill_file).is_file():
        print(f"error: spill_file '{args.spill_file}' does not exist", file=sys.stderr)
        return 2
    n = replay(args.spill_file, args.tracking_uri, args.run_id)
    print(f"sent {n} metric points to run {args.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
