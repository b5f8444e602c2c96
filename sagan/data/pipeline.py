"""Shards -> decoded samples -> batches: the stages both loaders put in a ``wds.DataPipeline``.

Tar parsing, grouping, shuffling, batching, resampling and worker splitting are webdataset's;
ours are the opening of each shard (resumable streams, one shard ahead, sha256 when asked), the
check of each shard's sample count against the manifest (``tarfile`` stops silently at a torn
header) and the validated decode. Details: docs/DATA.md ("Design notes").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from sagan.errors import one_line

from .errors import Counters, DataError, Health, RetryPolicy, ShardReadError
from .index import IMAGE_KEYS, image_key_of, label_of
from .manifest import Manifest, ShardInfo
from .prepare import transform_image
from .sources import image_array
from .storage import open_url

log = logging.getLogger(__name__)

MAX_SAMPLE_WARNINGS = 10  # per stream; after that only the counts grow


class Sample(NamedTuple):
    """One accepted sample. ``counts`` is the stream's ``Counters.snapshot()`` when it was
    accepted: a batch reports the newest of its samples', so skips met while webdataset looks
    ahead for the *next* batch are not charged to this one."""

    image: np.ndarray  # uint8 (S, S) or (S, S, 3)
    label: int | None
    key: str
    counts: tuple[int, int, int]


class Batch(NamedTuple):
    x: torch.Tensor  # float32 (B, C, S, S) in [-1, 1]
    y: torch.Tensor | None  # int64 (B,), None when unconditional
    keys: list[str]
    counts: tuple[int, int, int]


# --------------------------------------------------------------------------- splitting


def split_by_rank(shards: list[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    """``wds.split_by_node`` from explicit arguments (Ray gives us rank and world size; tests run
    several ranks in one process). With fewer shards than ranks, rank r reads shard r mod n
    (ranks then share shards, with a warning) rather than getting none and hanging DDP."""
    if len(shards) >= world_size:
        return shards[rank::world_size]
    log.warning("only %d shard(s) for %d ranks: ranks will share shards; write more shards "
                "(prepare_data --samples-per-shard) for disjoint per-rank data",
                len(shards), world_size)
    return [shards[rank % len(shards)]]


def worker_shards(urls: list[str], num_workers: int) -> list[str]:
    """``wds.split_by_worker`` when every loader worker can get a shard; otherwise each worker
    resamples all of the rank's shards (with its own seed) instead of idling."""
    if len(urls) >= num_workers:
        return list(wds.split_by_worker(urls))
    return list(urls)


# --------------------------------------------------------------------------- decoding


def decode_sample(sample: dict[str, Any], m: Manifest) -> tuple[np.ndarray, int | None] | str:
    """(uint8 HxW or HxWx3 array, label) or the reason the sample is rejected. Our shards
    must hold exactly the manifest's PNGs; an index's images are decoded and fitted."""
    if m.is_index:
        return _decode_indexed(sample, m)
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


def _decode_indexed(sample: dict[str, Any], m: Manifest) -> tuple[np.ndarray, int | None] | str:
    """A foreign sample: the index's image member (any format PIL reads) to the bound size,
    fit and channels (the same transform as prepare_data.py); the label by the index's rule.
    JPEGs are decoded at the smallest DCT scale that still covers the target (``draft``)."""
    idx = m.index or {}
    key = image_key_of(sample, idx.get("image_key"))
    if key is None:
        return f"no image member ({idx.get('image_key') or '/'.join(IMAGE_KEYS)})"
    mode = "L" if m.channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(sample[key])) as im:
            if im.format == "JPEG":
                im.draft(mode, (m.image_size, m.image_size))
            arr = transform_image(image_array(im, m.channels), m.image_size, m.channels, m.fit)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"undecodable image ({type(exc).__name__})"
    if not m.num_classes:
        return arr, None
    try:
        value = label_of(sample, idx.get("label"))
    except (ValueError, UnicodeDecodeError):
        return "invalid label"
    if value is None:
        return f"missing label ({idx.get('label')})"
    if isinstance(value, str) or idx.get("labels") == "names":
        try:
            value = m.class_names.index(str(value))
        except ValueError:
            return f"label {str(value)[:30]!r} is not one of the index's classes"
    if not 0 <= value < m.num_classes:
        return f"label {value} outside [0, {m.num_classes})"
    return arr, value


def collate(items: list[Sample], conditional: bool) -> Batch:
    """uint8 arrays -> float32 (B, C, S, S) in [-1, 1]; labels -> int64 (B,) or None."""
    arr = np.stack([s.image for s in items])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    # numpy, not torch ops: torch's intra-op thread pool thrashes on a busy small CPU box
    # (measured 35 ms vs 0.1 ms per 256x32x32 batch at load 6 on 2 cores).
    xf = np.ascontiguousarray(arr, dtype=np.float32)
    xf /= np.float32(127.5)
    xf -= np.float32(1.0)
    y = torch.tensor([s.label for s in items], dtype=torch.int64) if conditional else None
    counts = tuple(max(c) for c in zip(*(s.counts for s in items), strict=True))
    return Batch(torch.from_numpy(xf), y, [s.key for s in items], counts)  # type: ignore[arg-type]


def random_hflip(rng: Any) -> Any:
    """wds.map stage: mirror each sample left-right with probability 1/2."""
    def flip(s: Sample) -> Sample:
        return s._replace(image=s.image[:, ::-1]) if rng.random() < 0.5 else s

    return wds.map(flip)


# --------------------------------------------------------------------------- shard reader


class _FailedStream(io.RawIOBase):
    """Stands in for a shard that could not even be opened; raises its error on first read, so
    every failure takes the same path through webdataset's handler."""

    def __init__(self, exc: OSError) -> None:
        super().__init__()
        self._exc = exc

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        raise self._exc


@dataclasses.dataclass
class _ShardRead:
    """One read of one shard: how far it got, and whether it already counted as skipped."""

    shard: ShardInfo
    read: int = 0
    failed: bool = False


def _reason(exc: BaseException) -> str:
    """One line for a skipped shard. webdataset appends ``" @ <stream>"`` to ``args[0]`` and
    (stream, url) to ``args`` of an exception it passes on, so plain messages are rebuilt from
    the first argument (ours and errno-carrying OSErrors format themselves)."""
    if isinstance(exc, ShardReadError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return one_line(exc, with_type=True)
    first = str(exc.args[0]).split(" @ ", 1)[0] if exc.args else repr(exc)
    if isinstance(exc, tarfile.TarError):
        return f"tar error: {first}"
    return f"{type(exc).__name__}: {first}"


class ShardReader:
    """The stages that touch shards, and the state of one stream (one process or loader worker):
    its counters, outage clock, open streams and warnings.

    ``resampled_shards``: in a training stream, the number of distinct shards it draws from; once
    every one of them has come up empty (failed or only corrupt samples) since the last good
    sample, nothing readable remains and :meth:`samples` raises DataError instead of skipping
    forever. None for a single pass (the loader checks the total at the end).
    """

    def __init__(self, manifest: Manifest, endpoint_url: str | None, verify_sha256: bool,
                 policy: RetryPolicy, resampled_shards: int | None = None) -> None:
        self.manifest = manifest
        self.endpoint_url = endpoint_url
        self.verify_sha256 = verify_sha256
        self.policy = policy
        self.resampled_shards = resampled_shards
        self.counters = Counters()
        self.health = Health(policy)
        self.good = 0  # samples accepted by decode()
        self.last_error = ""  # of the latest skipped shard, for the "nothing readable" error
        self._by_url = {manifest.url(s.name): s for s in manifest.shards}
        self._open: set[IO[bytes]] = set()
        self._empty: set[str] = set()
        self._warned = 0

    # ---- stage: dict(url) -> dict(url, stream)

    def open_shards(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Open each shard one step ahead of the parser, so the next request and its first
        bytes are in flight (read-ahead thread) while the current shard is parsed."""
        pending: dict[str, Any] | None = None
        try:
            for item in src:
                opened = dict(item, stream=self._open_stream(item["url"]))
                if pending is not None:
                    yield pending
                pending = opened
            if pending is not None:
                last, pending = pending, None
                yield last
        finally:
            if pending is not None:
                pending["stream"].close()

    def _open_stream(self, url: str) -> IO[bytes]:
        try:
            stream = open_url(url, endpoint_url=self.endpoint_url, counters=self.counters,
                              policy=self.policy, health=self.health)
        except OSError as exc:  # a local file missing/unreadable: fail when read, like remotes
            stream = _FailedStream(exc)  # type: ignore[assignment]
        self._open.add(stream)
        return stream

    # ---- stage: dict(url, stream) -> raw samples {__key__, __url__, png, cls}

    def samples(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Each shard through webdataset's own tar expansion and grouping, then checked against
        the manifest's sample count (see module docstring)."""
        for source in sources:
            current = _ShardRead(self._by_url[source["url"]])
            stream = source["stream"]
            good_before = self.good
            try:
                with stream:
                    if self.verify_sha256:
                        source = self._verified(source, current)
                    if source is not None:
                        handler = functools.partial(self.skip_shard, current)
                        files = tar_file_expander([source], handler=handler)
                        for sample in group_by_keys(files, handler=handler):
                            current.read += 1
                            yield sample
            finally:
                self._open.discard(stream)
            # decode() has seen every sample of this shard by now: it is the very next stage
            # and pulls one sample at a time, so `self.good` is up to date.
            self._finish(current, self.good - good_before)

    def _verified(self, source: dict[str, Any], current: _ShardRead) -> dict[str, Any] | None:
        """The shard in memory once its sha256 matches (verification must precede delivery;
        costs one shard of RAM, never disk); None when it does not (counted as skipped)."""
        try:
            blob = source["stream"].read()
        except DataError:
            raise
        except (OSError, ValueError) as exc:
            self.skip_shard(current, exc)
            return None
        digest = hashlib.sha256(blob).hexdigest()
        if digest != current.shard.sha256:
            want = current.shard.sha256
            self.skip_shard(current, ShardReadError(
                f"sha256 mismatch ({digest[:12]}..., manifest says {want[:12]}...)"))
            return None
        return dict(source, stream=io.BytesIO(blob))

    def skip_shard(self, current: _ShardRead, exc: BaseException) -> bool:
        """webdataset ``handler=``: count the shard read as skipped (once), warn, continue with
        what follows (usually nothing: tarfile cannot resync). DataError stops the stream."""
        if isinstance(exc, DataError):
            raise exc
        if not isinstance(exc, OSError | EOFError | ValueError | tarfile.TarError):
            raise exc  # a bug, not bad data
        if not current.failed:
            current.failed = True
            self.counters.add("skipped_shards")
            name, reason = current.shard.name, _reason(exc)
            self.last_error = reason if name in reason else f"{name}: {reason}"
            log.warning("skipping rest of shard %s after %d samples: %s", name, current.read,
                        reason)
        return True

    def _finish(self, current: _ShardRead, good: int) -> None:
        shard = current.shard
        if not current.failed and current.read < shard.samples:
            self.counters.add("skipped_shards")
            self.last_error = f"{shard.name}: ended after {current.read} of {shard.samples} samples"
            log.warning("shard %s ended after %d of %d samples (truncated?); counted as skipped",
                        shard.name, current.read, shard.samples)
        if self.resampled_shards is None:
            return
        if good:
            self._empty.clear()
            return
        self._empty.add(shard.name)
        if len(self._empty) >= self.resampled_shards:
            raise DataError(
                f"no readable samples in {self.resampled_shards} shard(s) of "
                f"{self.manifest.location} (skipped {self.counters.get('skipped_shards')} shard "
                f"reads, {self.counters.get('skipped_samples')} samples; last error: "
                f"{self.last_error or 'all samples corrupt'})")

    # ---- wds.map function: raw sample -> Sample, or None (rejected, counted)

    def decode(self, sample: dict[str, Any]) -> Sample | None:
        out = decode_sample(sample, self.manifest)
        if isinstance(out, str):
            self.counters.add("skipped_samples")
            self._warned += 1
            if self._warned <= MAX_SAMPLE_WARNINGS:
                shard = posixpath.basename(str(sample.get("__url__", "")))
                log.warning("skipping sample %s in %s: %s%s", sample.get("__key__"), shard, out,
                            " (further sample warnings suppressed)"
                            if self._warned == MAX_SAMPLE_WARNINGS else "")
            return None
        self.good += 1
        return Sample(out[0], out[1], sample["__key__"], self.counters.snapshot())

    def close(self) -> None:
        """Close the streams still open (a pass stopped early: `limit`, end of an epoch)."""
        for stream in list(self._open):
            stream.close()
        self._open.clear()
