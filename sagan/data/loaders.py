"""The two ways to read a dataset: an endless, DDP-safe training stream (:func:`train_loader`:
split by rank and worker, then resampled; every rank gets exactly ``batches_per_epoch`` batches;
each epoch a fresh seeded draw) and one exact pass in manifest order (:func:`eval_loader`).
Why each choice: docs/DATA.md ("Design notes").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds

from .errors import DEFAULT_RETRY, DataError, DataStats, RetryPolicy
from .manifest import Manifest, ShardInfo, load_manifest
from .pipeline import ShardReader, collate, random_hflip, split_by_rank, worker_shards
from .storage import resolve_endpoint, scheme

PREFETCH_BATCHES = 2  # per loader worker (torch's prefetch_factor)


# --------------------------------------------------------------------------- training


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of batches; each ``iter()`` (in each loader worker) is one
    epoch's webdataset pipeline. Yields dicts: x, y, counts, worker (or error, counts, worker)."""

    def __init__(self, manifest: Manifest, shards: list[ShardInfo], batch_size: int,
                 shuffle_buffer: int, hflip: bool, verify_sha256: bool, seed: int, rank: int,
                 endpoint_url: str | None, policy: RetryPolicy) -> None:
        super().__init__()
        self.manifest, self.shards, self.batch_size = manifest, shards, batch_size
        self.shuffle_buffer, self.hflip, self.verify_sha256 = shuffle_buffer, hflip, verify_sha256
        self.seed, self.rank, self.endpoint_url, self.policy = seed, rank, endpoint_url, policy
        self._epoch = 0  # of this copy: each persistent worker holds its own
        self._reader: ShardReader | None = None  # per process; its counters span epochs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # threads and locks stay in their process

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        urls = worker_shards([self.manifest.url(s.name) for s in self.shards], num_workers)
        if self._reader is None:
            self._reader = ShardReader(self.manifest, self.endpoint_url, self.verify_sha256,
                                       self.policy, resampled_shards=len(set(urls)))
        reader = self._reader
        self._epoch += 1
        rng = random.Random(f"sagan-data/{self.seed}/{self.rank}/{worker}/{self._epoch}")
        stages: list[Any] = [
            wds.ResampledShards(urls, seed=rng.getrandbits(31), deterministic=True),
            reader.open_shards,
            reader.samples,
            wds.map(reader.decode),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                      rng=rng))
        if self.hflip:
            stages.append(random_hflip(rng))
        stages.append(wds.batched(self.batch_size, partial=False, collation_fn=functools.partial(
            collate, conditional=self.manifest.conditional)))
        try:
            for batch in wds.DataPipeline(*stages):
                yield {"x": batch.x, "y": batch.y, "counts": batch.counts, "worker": worker}
        except DataError as exc:  # in-band, so the main process gets one clean line
            yield {"error": str(exc), "counts": reader.counters.snapshot(), "worker": worker}
        finally:
            reader.close()


class TrainLoader:
    """Exactly ``batches_per_epoch`` batches per ``iter()`` on every rank (see module docstring).

    Yields ``(x, y)``: float32 (B, C, S, S) in [-1, 1]; int64 (B,) or None (unconditional).
    """

    def __init__(self, stream: TrainStream, batches_per_epoch: int, loader_workers: int,
                 world_size: int) -> None:
        self.dataset = stream
        self.manifest = stream.manifest
        self.batch_size = stream.batch_size
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = stream.rank, world_size
        self.loader_workers = loader_workers
        self.epoch = 0
        self._samples = 0
        self._counts: dict[int, tuple[int, int, int]] = {}  # latest cumulative, per worker
        self._loader = wds.WebLoader(
            stream, batch_size=None, num_workers=loader_workers,
            persistent_workers=loader_workers > 0,
            prefetch_factor=PREFETCH_BATCHES if loader_workers else None,
        ).with_epoch(batches_per_epoch)

    @property
    def stats(self) -> DataStats:
        """Counts so far, accumulated in this (the main) process; a snapshot copy."""
        totals = [sum(c) for c in zip(*self._counts.values(), strict=True)] or [0, 0, 0]
        return DataStats(skipped_samples=totals[0], skipped_shards=totals[1],
                         retries=totals[2], samples=self._samples)

    @property
    def shards(self) -> list[ShardInfo]:
        """This rank's shards."""
        return list(self.dataset.shards)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        delivered = 0
        for item in self._loader:
            self._counts[int(item["worker"])] = tuple(int(v) for v in item["counts"])
            if "error" in item:
                self.close()
                raise DataError(item["error"])
            delivered += 1
            self._samples += int(item["x"].shape[0])
            yield item["x"], item["y"]
        if delivered < self.batches_per_epoch:  # a resampled stream never ends by itself
            self.close()
            raise DataError(f"training stream ended after {delivered} of "
                            f"{self.batches_per_epoch} batches")
        self.epoch += 1

    def close(self) -> None:
        """Stop the (persistent) loader workers; they also stop when the loader is collected.
        torch has no public call for this: the worker pool hangs off the DataLoader."""
        dataloader = self._loader.stage(0)
        it, dataloader._iterator = getattr(dataloader, "_iterator", None), None
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
        m = load_manifest(str(path), endpoint, policy, **index_options(cfg_or_path))
    except DataError as exc:
        if getattr(cfg_or_path, "prepare_source", None) and "no manifest.json" in str(exc):
            raise DataError(f"{exc}; data.prepare_source is set: call "
                            "sagan.data.ensure_dataset(cfg.data, image_size, channels) "
                            "first") from None
        raise
    fit = getattr(cfg_or_path, "fit", None)
    return m.bind(m.image_size, m.channels, fit) if m.is_index and fit else m


def index_options(data_cfg: Any) -> dict[str, Any]:
    """load_manifest's index arguments from a DataConfig (defaults for a bare path)."""
    if not hasattr(data_cfg, "path"):  # a str, a Path, None: the defaults
        return {"index": None, "image_key": None, "label": "cls"}
    return {"index": getattr(data_cfg, "index", None),
            "image_key": getattr(data_cfg, "image_key", None),
            "label": getattr(data_cfg, "label", "cls")}


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
    policy = retry or dataclasses.replace(
        DEFAULT_RETRY, max_outage_s=getattr(data_cfg, "max_outage_s", DEFAULT_RETRY.max_outage_s))
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
        if scheme(m.url("")) == "s3" else None
    stream = TrainStream(
        m, split_by_rank(shards, rank, world_size), batch_size,
        shuffle_buffer=int(getattr(data_cfg, "shuffle_buffer", 1000)),
        hflip=bool(getattr(data_cfg, "hflip", False)),
        verify_sha256=bool(getattr(data_cfg, "verify_sha256", False)),
        seed=seed, rank=rank, endpoint_url=endpoint, policy=policy)
    return TrainLoader(stream, batches_per_epoch, int(getattr(data_cfg, "loader_workers", 0)),
                       world_size)


# --------------------------------------------------------------------------- single pass


class EvalLoader:
    """One deterministic pass per ``iter()``: every sample exactly once, shards in manifest
    order, no shuffle, no resampling, last batch possibly short. ``stats`` describes the latest
    pass."""

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
        reader = ShardReader(self.manifest, self.endpoint_url, self.verify_sha256, self.policy)
        shards = [s for s in self.manifest.shards if s.samples > 0]
        if not shards:
            return
        stages: list[Any] = [
            wds.SimpleShardList([self.manifest.url(s.name) for s in shards]),
            reader.open_shards,
            reader.samples,
            wds.map(reader.decode),
        ]
        if self.limit is not None:
            stages.append(wds.slice(self.limit))
        stages.append(wds.batched(self.batch_size, partial=True, collation_fn=functools.partial(
            collate, conditional=self.manifest.conditional)))

        def sync() -> None:
            c = reader.counters
            self._stats.skipped_samples = c.get("skipped_samples")
            self._stats.skipped_shards = c.get("skipped_shards")
            self._stats.retries = c.get("retries")

        try:
            for batch in wds.DataPipeline(*stages):
                self._stats.samples += len(batch.keys)
                sync()
                yield (batch.x, batch.y, batch.keys) if self.with_keys else (batch.x, batch.y)
        finally:
            reader.close()
            sync()
        if self._stats.samples == 0:
            raise DataError(
                f"no readable samples in {self.manifest.location}: skipped "
                f"{self._stats.skipped_shards} of {len(shards)} shards and "
                f"{self._stats.skipped_samples} samples (last error: "
                f"{reader.last_error or 'all samples corrupt'})")


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
                                or m.endpoint_url) if scheme(m.url("")) == "s3" else None
    return EvalLoader(m, batch_size, limit, endpoint, verify_sha256, with_keys, policy)
