"""The real image set FID/KID compare against, and the on-disk cache of its Inception features.

A real set is named by its identity (the manifest's content hash for shard paths, a pixel hash
for in-memory images), resolution, image count and the weights' fingerprint, so a cache entry
is never reused for another set, size or network. Its images are read only when the cache
misses: an in-training evaluation then costs Inception on the generated images alone.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sagan.config import DataConfig
from sagan.eval.weights import FEATURE_EXTRACTOR, POOL_LAYER


class RealDataError(ValueError):
    """The real image set is empty or its images cannot be used (wrong shape/channels)."""


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] (or uint8) -> uint8 (B, 3, H, W) on CPU, as Inception wants.

    Greyscale is repeated to 3 channels; floats are mapped with the exact inverse of the
    loader's `png / 127.5 - 1`, so real images round-trip bit-exactly."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise RealDataError(f"images must be (B, 1|3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.detach().float() + 1.0) * 127.5).round().clamp_(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.cpu().contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """A float/uint8 batch at size x size (antialiased bilinear), same dtype."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    was_u8 = x.dtype == torch.uint8
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round().clamp_(0, 255).to(torch.uint8) if was_u8 else y.clamp_(-1, 1)


def collect_images(batches: Iterable[Any], limit: int, resolution: int | None = None,
                   progress: bool = False, desc: str = "real images") -> torch.Tensor:
    """Up to `limit` images from batches ((x, y) as `sagan.data.eval_loader` yields, or bare
    tensors; float in [-1, 1] or uint8) as one uint8 (N, 3, S, S) tensor, resized to
    `resolution` when it differs."""
    return collect_labelled(batches, limit, resolution, progress, desc)[0]


def collect_labelled(batches: Iterable[Any], limit: int, resolution: int | None = None,
                     progress: bool = False, desc: str = "real images"
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`collect_images` and the class labels of (x, y) batches (None when any batch has none):
    intra-class FID compares each class with its own real images."""
    from tqdm import tqdm

    if isinstance(batches, torch.Tensor):
        batches = [batches]
    parts, labels, n = [], [], 0
    with tqdm(total=limit, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for item in batches:
            x = item[0] if isinstance(item, tuple | list) else item
            y = item[1] if isinstance(item, tuple | list) and len(item) > 1 else None
            if not isinstance(x, torch.Tensor):
                raise RealDataError(f"real set: expected image tensors or (x, y) batches, got "
                                    f"{type(x).__name__}")
            x = (x.unsqueeze(0) if x.dim() == 3 else x)[: limit - n]
            labels.append(torch.as_tensor(y).reshape(-1)[: x.shape[0]].long()
                          if isinstance(y, torch.Tensor) and y.numel() >= x.shape[0] else None)
            if resolution is not None:
                x = resize(x, resolution)
            parts.append(to_uint8_rgb(x))
            n += x.shape[0]
            bar.update(x.shape[0])
            if n >= limit:
                break
    if n == 0:
        raise RealDataError("real set is empty: no images to compare against")
    y_all = None if any(part is None for part in labels) else torch.cat(labels)
    return torch.cat(parts), y_all


def real_cache_key(source_id: str, resolution: int, num_images: int, weights_tag: str) -> str:
    """Cache name of a real set: identity + resolution + count + weights."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_id)[:48]
    return f"sagan-real-{safe}-{resolution}px-n{num_images}-inc{weights_tag}"


class RealStatsCache:
    """Inception features of real sets, one file per (key, layer): `<key>-inception-v3-compat-
    features-<layer>.pt`, float32 (N, D). Writes are atomic, so jobs may share a directory."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(os.path.expandvars(str(cache_dir))).expanduser()

    def path(self, key: str, layer: str = POOL_LAYER) -> Path:
        return self.root / f"{key}-{FEATURE_EXTRACTOR}-features-{layer}.pt"

    def has(self, key: str, layers: Iterable[str] = (POOL_LAYER,)) -> bool:
        return all(self.path(key, layer).is_file() for layer in layers)

    def features(self, key: str, layer: str = POOL_LAYER) -> torch.Tensor | None:
        p = self.path(key, layer)
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    def count(self, key: str) -> int | None:
        """Number of real images behind an entry (reads only the tensor header)."""
        p = self.path(key)
        if not p.is_file():
            return None
        return int(torch.load(p, map_location="cpu", weights_only=True, mmap=True).shape[0])

    def put(self, key: str, features: dict[str, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for layer, f in features.items():
            p = self.path(key, layer)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
            torch.save(f.to(torch.float32).contiguous(), tmp)
            os.replace(tmp, p)

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        marker = f"-{FEATURE_EXTRACTOR}-features-"
        return sorted({p.name.split(marker)[0] for p in self.root.glob(f"*{marker}*.pt")})

    def clear(self, key: str | None = None) -> int:
        """Delete one entry (or all); returns the number of files removed."""
        if not self.root.is_dir():
            return 0
        files = list(self.root.glob(f"{key or '*'}-{FEATURE_EXTRACTOR}-features-*.pt"))
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)


@dataclass
class RealSet:
    """A real image set: its cache identity, its images and class labels (None when it has
    none), read on first use, and for the protocol logged with each score its name and
    `description` (a prepared set's manifest source: dataset, split, seed)."""

    source_id: str
    num_images: int
    load: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False)
    _images: torch.Tensor | None = field(default=None, repr=False)
    _labels: torch.Tensor | None = field(default=None, repr=False)
    name: str = "in-memory"
    description: str = ""

    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images, self._labels = self.load()
        return self._images

    def labels(self) -> torch.Tensor | None:
        self.images()
        return self._labels


def _tensor_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_real(real: Any, num_images: int, resolution: int, batch_size: int = 64,
                 endpoint_url: str | None = None, real_key: str | None = None,
                 progress: bool = False) -> RealSet:
    """A data path / DataConfig / iterable of batches (or a RealSet) as a cache-addressable
    RealSet. Shard paths are named by the manifest's content hash and read only on a cache miss;
    any other iterable is read now (it may be one-shot) and named by `real_key` or its pixels."""
    if isinstance(real, RealSet):
        return real
    if isinstance(real, str | os.PathLike | DataConfig):
        from sagan import data as sdata

        path = real.path if isinstance(real, DataConfig) else str(real)
        ep = endpoint_url or (real.endpoint_url if isinstance(real, DataConfig) else None)
        manifest = sdata.load_manifest(path, endpoint_url=ep, **sdata.index_options(real))
        if manifest.is_index:  # shards as others wrote them: decoded at the generator's size
            manifest = manifest.bind(resolution, manifest.channels,
                                     getattr(real, "fit", None) or "crop")
        n = min(num_images, int(manifest.total))
        if n < 2:
            raise RealDataError(f"real set '{path}': needs at least 2 images, manifest lists "
                                f"{manifest.total}")

        def load() -> tuple[torch.Tensor, torch.Tensor | None]:
            source = real if isinstance(real, DataConfig) else path
            loader = sdata.eval_loader(source, batch_size, limit=n, endpoint_url=ep,
                                       manifest=manifest)
            images, labels = collect_labelled(loader, n, resolution, progress,
                                              desc=f"reading {path}")
            if images.shape[0] < n:
                warnings.warn(f"real set '{path}': read {images.shape[0]} of {n} images "
                              "(corrupt samples skipped); metrics use what was read",
                              stacklevel=2)
            return images, labels if manifest.conditional else None

        return RealSet(real_key or manifest.content_hash()[:16], n, load,
                       name=path.rstrip("/").rsplit("/", 1)[-1] or path,
                       description=str(manifest.source))
    images, labels = collect_labelled(real, num_images, resolution, progress)
    if images.shape[0] < 2:
        raise RealDataError(f"real set: needs at least 2 images, got {images.shape[0]}")
    return RealSet(real_key or _tensor_digest(images), images.shape[0],
                   lambda: (images, labels), images, labels)
