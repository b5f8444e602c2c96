"""Raw dataset -> shards: the one preparation transform, `prepare_dataset`, and
`ensure_dataset`, which prepares a missing local dataset on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from sagan.config import FITS

from .errors import DataError
from .manifest import Manifest, ShardInfo, load_manifest
from .sources import Source, SourceError, open_source
from .writer import begin_shards, publish_manifest, write_shard_range

Mapper = Callable[[Callable[..., Any], list[tuple]], Iterable[Any]]

__all__ = ["FITS", "ensure_dataset", "prepare_dataset", "transform_image"]



def transform_image(img: np.ndarray, image_size: int, channels: int,
                    fit: str = "resize") -> np.ndarray:
    """The single preparation transform: channel conversion, then geometry.

    ``fit``: ``resize`` scales the longer side to ``image_size`` (aspect kept) and centre-pads
    the rest with black (a square input is just resized); ``crop`` scales the shorter side and
    centre-crops; ``pad`` never upscales: smaller images are centre-padded, larger ones behave as
    ``resize``. Resampling is Lanczos. Returns uint8 (S, S) for channels=1, (S, S, 3) for 3.
    Public so tests and users can reproduce exactly what the shards contain.
    """
    if fit not in FITS:
        raise SourceError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    im = Image.fromarray(a)
    if channels == 1 and im.mode != "L":
        im = im.convert("L")
    elif channels == 3 and im.mode != "RGB":
        im = im.convert("RGB")
    w, h = im.size
    s = image_size
    if (w, h) != (s, s):
        if fit == "crop":
            scale = s / min(w, h)
        elif fit == "pad" and w <= s and h <= s:
            scale = 1.0
        else:
            scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        if (nw, nh) != (s, s):
            canvas = Image.new(im.mode, (s, s))  # black
            canvas.paste(im, ((s - nw) // 2, (s - nh) // 2))  # negative offsets crop
            im = canvas
    return np.asarray(im)


# --------------------------------------------------------------------------- prepare


def prepare_dataset(source: str, out: str, image_size: int = 32, channels: int | None = None,
                    grey_to_rgb: bool = False, limit: int | None = None, seed: int = 0,
                    samples_per_shard: int = 1000, endpoint_url: str | None = None,
                    split: str = "train", fit: str = "resize", unconditional: bool = False,
                    progress: bool = False, map_fn: Mapper | None = None,
                    shards_per_task: int | None = None, tasks: int = 8) -> Manifest:
    """Read `source`, transform, shuffle deterministically with `seed`, write shards to `out`.

    ``channels=None`` keeps the source's (1 for MNIST-likes, 3 for CIFAR/folders);
    ``grey_to_rgb`` (or channels=3) replicates grey into RGB; channels=1 converts colour to luma.
    ``limit`` keeps the first N after the shuffle, i.e. a seeded random subset. Sample keys are
    the source index (``%09d``), so any sample can be traced back.

    ``map_fn(encode_range, argument tuples)``, when given, runs the encoding as parallel tasks
    of ``shards_per_task`` shards each (default: as many as make about ``tasks`` tasks; each
    task re-opens the source, which costs a directory listing or an idx read, so tasks should
    be few times the workers, not one per shard) and yields their shard lists in any order
    (pipelines/prepare_data.py passes Ray tasks; the source path must be readable where the
    tasks run); the manifest is written last, here. The shards are the same bytes either way:
    each task gets the slice of the one seeded order its shard numbers cover.
    """
    if image_size <= 0:
        raise SourceError(f"image_size must be > 0, got {image_size}")
    if channels not in (None, 1, 3):
        raise SourceError(f"channels must be 1 or 3, got {channels}")
    if limit is not None and limit <= 0:
        raise SourceError(f"limit must be > 0, got {limit}")
    if fit not in FITS:
        raise SourceError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    if shards_per_task is not None and shards_per_task <= 0:
        raise SourceError(f"shards_per_task must be > 0, got {shards_per_task}")
    src = open_source(source, split=split, unconditional=unconditional)
    ch = channels or (3 if grey_to_rgb else src.channels)
    if grey_to_rgb and ch == 1:
        raise SourceError("grey_to_rgb conflicts with channels=1")
    order = np.random.default_rng(seed).permutation(len(src))
    if limit is not None:
        order = order[:limit]
    if len(order) == 0:
        raise DataError(f"no samples to write to {out}")
    begin_shards(out, endpoint_url)
    num = src.num_classes
    if map_fn is None:
        items: Any = _samples(src, order, ch, image_size, fit)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, total=len(order), unit="img", desc=f"writing {out}")
        shards = write_shard_range(items, out, image_size, ch, num, samples_per_shard,
                                   endpoint_url=endpoint_url)
    else:
        num_shards = -(-len(order) // samples_per_shard)
        per_task = samples_per_shard * (shards_per_task or -(-num_shards // max(1, tasks)))
        jobs = [(source, split, unconditional, order[i:i + per_task].tolist(), ch, image_size,
                 fit, out, num, samples_per_shard, i // samples_per_shard, endpoint_url)
                for i in range(0, len(order), per_task)]
        shards = sorted((s for part in map_fn(encode_range, jobs) for s in part),
                        key=lambda s: s.name)
    return publish_manifest(out, shards, image_size, ch, num, src.class_names,
                            f"{src.name} ({split}, seed {seed}, fit {fit})", endpoint_url)


def _samples(src: Source, order: Any, ch: int, image_size: int, fit: str
             ) -> Iterator[tuple[np.ndarray, int | None, str]]:
    for i in order:
        img, label = src.get(int(i), ch)
        yield transform_image(img, image_size, ch, fit), label, f"{int(i):09d}"


def encode_range(source: str, split: str, unconditional: bool, indices: list[int], ch: int,
                 image_size: int, fit: str, out: str, num_classes: int,
                 samples_per_shard: int, first_shard: int, endpoint_url: str | None
                 ) -> list[ShardInfo]:
    """One parallel task of :func:`prepare_dataset`: these source indices, transformed, as
    shards ``first_shard``, ... (uploaded when each is complete)."""
    src = open_source(source, split=split, unconditional=unconditional)
    return write_shard_range(_samples(src, indices, ch, image_size, fit), out, image_size, ch,
                             num_classes, samples_per_shard, first_shard=first_shard,
                             first_index=first_shard * samples_per_shard,
                             endpoint_url=endpoint_url)


def ensure_dataset(data_cfg: Any, image_size: int, channels: int,
                   samples_per_shard: int = 1000, path: str | None = None,
                   split: str = "train") -> Manifest:
    """Load ``path`` (default ``data_cfg.path``); if it is a local directory without a
    manifest and ``data_cfg.prepare_source`` is set, prepare that split of the source first
    (once: concurrent callers, e.g. the ranks of one machine, wait on a lock file and then
    load what the first one wrote)."""
    own = path is None or path == data_cfg.path  # data.index belongs to data.path only
    path = str(data_cfg.path if path is None else path)
    endpoint = getattr(data_cfg, "endpoint_url", None)
    source = getattr(data_cfg, "prepare_source", None)
    remote = "://" in path and not path.startswith("file://")
    if remote or not source:
        from .loaders import index_options

        return load_manifest(path, endpoint, **{**index_options(data_cfg),
                                                **({} if own else {"index": None})})
    import fcntl

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            m = load_manifest(path, endpoint)
        except DataError:
            m = prepare_dataset(source, path, image_size=image_size, channels=channels,
                                samples_per_shard=samples_per_shard, split=split)
    if m.image_size != image_size or m.channels != channels:
        raise DataError(f"{path}: prepared {m.image_size}px x{m.channels}, "
                        f"but model needs {image_size}px x{channels}")
    return m
