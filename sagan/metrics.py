"""FID, KID and Inception Score through torch-fidelity, with cached real-set features.

    from sagan.metrics import compute_metrics
    scores = compute_metrics(G_ema, cfg.eval, real=cfg.data.path, device="cuda")
    # {'fid': 31.2, 'kid': 0.021, 'kid_std': 0.001, 'is': 5.4, 'is_std': 0.2}

Design notes (why it looks like this):

* Fakes are handed to torch-fidelity as a Dataset of uint8 images that we generate ourselves,
  not through `GenerativeModelModuleWrapper`: torch-fidelity 0.4's generator path draws class
  labels with `np.int`, which no longer exists in numpy >= 1.24 (every conditional model would
  crash), it cannot place a model on `cuda:N`, and our G wants 1-channel output repeated to RGB.
  Generating ourselves also lets us use balanced class labels and a fixed seed, so two
  evaluations of the same weights give the same number.
* Real-set features are cached with torch-fidelity's own file cache (`cache_root` +
  `input2_cache_name`). The cache name is built from the data set's identity (manifest content
  hash, or a hash of the given images), the evaluation resolution, the real sample count and a
  fingerprint of the Inception weights file, so a cache entry can never be reused for a
  different set, size or feature extractor. The real Dataset is lazy: on a cache hit torch-fidelity
  never indexes it, so neither the shards are read nor Inception is run on real images again.
* We always ask torch-fidelity for both the 2048-d pool features and the logits when FID or KID
  is requested (IS is only computed on fakes; the logits cost one linear layer). That keeps the
  set of cached real feature files the same whatever subset of metrics a caller asks for, so
  switching `eval.metrics` between runs does not invalidate the cache.
* Inception weights are resolved before torch-fidelity sees them: `eval.inception_weights`, else
  `$TORCH_HOME/hub/checkpoints/<torch-fidelity's file name>`, else a download into that same
  place. Anything missing or unfetchable raises `InceptionWeightsError` with one line naming the
  file and both places it may go, instead of a urllib traceback from deep inside torch-fidelity.

This module never imports ray or mlflow; it runs on CPU or CUDA on any rank (call it on rank 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sagan.config import DataConfig, EvalConfig

FEATURE_EXTRACTOR = "inception-v3-compat"
POOL_LAYER = "2048"  # torch-fidelity's default layer for FID and KID
LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's default layer for IS
DOWNLOAD_TIMEOUT_S = 30.0


def inception_url() -> str:
    """torch-fidelity's download URL for its InceptionV3 weights (read from its source)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_filename() -> str:
    """The file name torch.hub stores the download under (the URL's basename); for
    torch-fidelity 0.3/0.4 'weights-inception-2015-12-05-6726825d.pth'."""
    return os.path.basename(urlparse(inception_url()).path)


def __getattr__(name: str) -> str:
    # INCEPTION_URL / INCEPTION_FILENAME are resolved lazily: importing torch_fidelity costs
    # ~3 s (it pulls in CLIP and torchvision ops), which `import sagan.metrics` should not.
    if name == "INCEPTION_URL":
        return inception_url()
    if name == "INCEPTION_FILENAME":
        return inception_filename()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InceptionWeightsError(RuntimeError):
    """The InceptionV3 weights are missing, unfetchable or not a torch-fidelity state dict."""


class RealDataError(ValueError):
    """The real image set is empty or its images cannot be used (wrong shape/channels)."""


# --------------------------------------------------------------------------- Inception weights


def hub_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded weights: honours $TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_filename()


def _where_to_put_it() -> str:
    return (f"set eval.inception_weights: /path/to/{inception_filename()} (CLI: "
            f"--inception-weights PATH) or place it at {hub_weights_path()} "
            f"($TORCH_HOME/hub/checkpoints/); download URL: {inception_url()}")


def _download(url: str, dst: Path, progress: bool) -> None:
    """torch.hub's downloader with a socket timeout, so a firewalled cluster fails, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(configured: str | os.PathLike | None = None, download: bool = True,
                              progress: bool = False) -> Path:
    """Path of a usable InceptionV3 weights file, or InceptionWeightsError in one line.

    Order: `configured` (eval.inception_weights) -> torch.hub's checkpoint dir -> download there.
    A configured path that does not exist is an error, never silently replaced by a download:
    on an offline cluster that is almost certainly a typo the user wants to hear about.
    """
    if configured:
        path = Path(os.path.expandvars(str(configured))).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"Inception weights file '{path}' (eval.inception_weights) not found: it must be "
                f"torch-fidelity's {inception_filename()}; {_where_to_put_it()}")
        return path
    path = hub_weights_path()
    if path.is_file():
        return path
    if not download:
        raise InceptionWeightsError(
            f"Inception weights '{inception_filename()}' not found and downloading is disabled; "
            f"{_where_to_put_it()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(inception_url(), path, progress)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, timeouts, SSL, disk errors
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InceptionWeightsError(
            f"Inception weights '{inception_filename()}' are not available offline and could not "
            f"be downloaded ({type(exc).__name__}: {reason}); {_where_to_put_it()}") from None
    return path


_WEIGHTS_TAGS: dict[tuple[str, int, int], str] = {}


def weights_fingerprint(path: str | os.PathLike) -> str:
    """Short sha256 of a weights file, after checking it is an InceptionV3 state dict.

    Part of every real-cache key: features from the official weights and from a test file with
    random init must never be mixed. Memoised per (path, size, mtime) since the file is ~95 MB.
    """
    path = Path(path)
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _WEIGHTS_TAGS:
        return _WEIGHTS_TAGS[memo_key]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files raise many types
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InceptionWeightsError(
            f"Inception weights file '{path}' is unreadable ({first}); {_where_to_put_it()}"
        ) from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise InceptionWeightsError(
            f"Inception weights file '{path}' is not torch-fidelity's InceptionV3 state dict "
            f"(expected keys like 'Conv2d_1a_3x3.conv.weight' and fc.weight of shape "
            f"(1008, 2048)); {_where_to_put_it()}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    tag = digest.hexdigest()[:12]
    _WEIGHTS_TAGS[memo_key] = tag
    return tag


# --------------------------------------------------------------------------- image conversion


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] (or uint8) -> uint8 (B, 3, H, W) on CPU, as Inception wants.

    Greyscale is repeated to 3 channels; floats are mapped with the exact inverse of the
    loader's `png / 127.5 - 1`, so real images round-trip bit-exactly.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise RealDataError(f"images must be (B, 1|3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.detach().float() + 1.0) * 127.5).round().clamp_(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.cpu().contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a float/uint8 batch to size x size (antialiased bilinear), keeping its dtype."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    was_u8 = x.dtype == torch.uint8
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round().clamp_(0, 255).to(torch.uint8) if was_u8 else y.clamp_(-1, 1)


class ImageTensorDataset(Dataset):
    """A uint8 (N, 3, H, W) tensor as the per-image Dataset torch-fidelity consumes."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class LazyImageDataset(Dataset):
    """Dataset whose images are only produced (shards read) when torch-fidelity first needs them.

    On a real-feature cache hit torch-fidelity never touches its input Dataset, so wrapping the
    loader in this class is what makes a cached evaluation skip reading the real data entirely.
    """

    def __init__(self, load: Callable[[], torch.Tensor]):
        self._load = load
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._load()
        return self._images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def collect_images(batches: Iterable[Any], limit: int, resolution: int | None = None,
                   progress: bool = False, desc: str = "real images") -> torch.Tensor:
    """Read up to `limit` images from an iterable of batches into one uint8 (N, 3, S, S) tensor.

    Accepts what `sagan.data.eval_loader` yields ((x, y) with x float in [-1, 1]) as well as
    bare tensors (B, C, H, W) / (C, H, W), float in [-1, 1] or uint8; a single (N, C, H, W)
    tensor works too. Images are resized to `resolution` when it differs.
    """
    from tqdm import tqdm

    if isinstance(batches, torch.Tensor):
        batches = [batches]
    parts, n = [], 0
    with tqdm(total=limit, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for item in batches:
            x = item[0] if isinstance(item, tuple | list) else item
            if not isinstance(x, torch.Tensor):
                raise RealDataError(f"real set: expected image tensors or (x, y) batches, got "
                                    f"{type(x).__name__}")
            if x.dim() == 3:
                x = x.unsqueeze(0)
            x = x[: limit - n]
            if resolution is not None:
                x = _resize(x, resolution)
            parts.append(to_uint8_rgb(x))
            n += x.shape[0]
            bar.update(x.shape[0])
            if n >= limit:
                break
    if n == 0:
        raise RealDataError("real set is empty: no images to compare against")
    return torch.cat(parts)


# --------------------------------------------------------------------------- real-set cache


def real_cache_key(source_id: str, resolution: int, num_images: int, weights_tag: str) -> str:
    """torch-fidelity cache name of a real set: identity + resolution + count + weights."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source_id)[:48]
    return f"sagan-real-{safe}-{resolution}px-n{num_images}-inc{weights_tag}"


class RealStatsCache:
    """The on-disk cache of real-set Inception features and FID statistics.

    Entries are written by torch-fidelity itself (`cache_root`, `input2_cache_name`); this class
    knows its file naming (`<key>-inception-v3-compat-features-<layer>.pt`,
    `<key>-inception-v3-compat-stat-fid-<layer>.pt`) so callers and tests can list, read and
    clear entries without going through torch-fidelity.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(os.path.expandvars(str(cache_dir))).expanduser()

    def _features_path(self, key: str, layer: str) -> Path:
        return self.root / f"{key}-{FEATURE_EXTRACTOR}-features-{layer}.pt"

    def _stats_path(self, key: str, layer: str = POOL_LAYER) -> Path:
        return self.root / f"{key}-{FEATURE_EXTRACTOR}-stat-fid-{layer}.pt"

    def has(self, key: str, layers: Iterable[str] = (POOL_LAYER, LOGITS_LAYER)) -> bool:
        """True when every feature file torch-fidelity needs for `key` is present."""
        return all(self._features_path(key, layer).is_file() for layer in layers)

    def features(self, key: str, layer: str = POOL_LAYER) -> torch.Tensor | None:
        """Cached real features (N, D) for `key`, or None when absent."""
        p = self._features_path(key, layer)
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    def count(self, key: str) -> int | None:
        """Number of real images behind a cached entry (reads only the tensor header)."""
        p = self._features_path(key, POOL_LAYER)
        if not p.is_file():
            return None
        return int(torch.load(p, map_location="cpu", weights_only=True, mmap=True).shape[0])

    def stats(self, key: str) -> dict[str, Any] | None:
        """Cached FID statistics {'mu': (D,), 'sigma': (D, D)} (numpy) for `key`, or None."""
        p = self._stats_path(key)
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

    def keys(self) -> list[str]:
        """All cache keys that have at least one feature file."""
        if not self.root.is_dir():
            return []
        marker = f"-{FEATURE_EXTRACTOR}-features-"
        return sorted({p.name.split(marker)[0] for p in self.root.glob(f"*{marker}*.pt")})

    def clear(self, key: str | None = None) -> int:
        """Delete one entry (or all of them); returns the number of files removed."""
        if not self.root.is_dir():
            return 0
        pattern = f"{key}-{FEATURE_EXTRACTOR}-*.pt" if key else f"*-{FEATURE_EXTRACTOR}-*.pt"
        files = list(self.root.glob(pattern))
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)

    def fidelity_kwargs(self, key: str) -> dict[str, Any]:
        """The calculate_metrics arguments that make torch-fidelity cache input2 under `key`."""
        self.root.mkdir(parents=True, exist_ok=True)
        return {"cache": True, "cache_root": str(self.root), "input2_cache_name": key}


@dataclasses.dataclass
class RealSet:
    """A real image set ready for torch-fidelity: lazy Dataset + its identity for the cache."""

    dataset: Dataset
    source_id: str
    num_images: int


def _tensor_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_real(real: Any, num_images: int, resolution: int, batch_size: int = 64,
                 endpoint_url: str | None = None, real_key: str | None = None,
                 progress: bool = False) -> RealSet:
    """Turn a data path / DataConfig / iterable of batches into a cache-addressable RealSet.

    Paths (local, s3://, http(s)://) and DataConfigs go through `sagan.data`: the manifest's
    content hash names the set, and the shards are only read if the cache misses. Any other
    iterable is read now (it may be a one-shot loader) and named by `real_key` or, when that is
    None, by a hash of its pixels, so identical in-memory sets also share a cache entry.
    """
    if isinstance(real, str | os.PathLike | DataConfig):
        from sagan import data as sdata

        path = real.path if isinstance(real, DataConfig) else str(real)
        ep = endpoint_url or (real.endpoint_url if isinstance(real, DataConfig) else None)
        manifest = sdata.load_manifest(path, endpoint_url=ep)
        n = min(num_images, int(manifest.total))
        if n < 2:
            raise RealDataError(f"real set '{path}': needs at least 2 images, manifest lists "
                                f"{manifest.total}")

        def load() -> torch.Tensor:
            loader = sdata.eval_loader(real, batch_size, limit=n, endpoint_url=ep,
                                       manifest=manifest)
            images = collect_images(loader, n, resolution, progress, desc=f"reading {path}")
            if images.shape[0] < n:
                warnings.warn(f"real set '{path}': read {images.shape[0]} of {n} images "
                              "(corrupt samples skipped); metrics use what was read",
                              stacklevel=2)
            return images

        source_id = real_key or manifest.content_hash()[:16]
        return RealSet(LazyImageDataset(load), source_id, n)
    images = collect_images(real, num_images, resolution, progress)
    if images.shape[0] < 2:
        raise RealDataError(f"real set: needs at least 2 images, got {images.shape[0]}")
    return RealSet(ImageTensorDataset(images), real_key or _tensor_digest(images),
                   images.shape[0])


# --------------------------------------------------------------------------- fakes


@torch.no_grad()
def generate_images(generator: nn.Module, num_images: int, batch_size: int = 64,
                    device: str | torch.device = "cpu", seed: int = 0,
                    num_classes: int | None = None, progress: bool = False) -> torch.Tensor:
    """`num_images` samples of G as uint8 (N, 3, S, S) on CPU, from a fixed seed.

    Noise comes from a CPU torch.Generator (same numbers on CPU and GPU); class labels are
    balanced (each class num_images/K times, shuffled), which lowers the variance of FID against
    a balanced real set. G is put in eval mode (BN running stats, no SN power iteration) and its
    previous mode restored, since the trainer calls this mid-training.
    """
    from tqdm import tqdm

    G = getattr(generator, "module", generator)  # DDP / compile wrappers
    device = torch.device(device)
    k = G.num_classes if num_classes is None else num_classes
    rng = torch.Generator().manual_seed(seed)
    z_all = torch.randn(num_images, G.z_dim, generator=rng)
    y_all = None
    if k > 0:
        y_all = (torch.arange(num_images) % k)[torch.randperm(num_images, generator=rng)]
    was_training = G.training
    G.eval()
    out = []
    try:
        for start in tqdm(range(0, num_images, batch_size), desc="generating", unit="batch",
                          disable=not progress, leave=False):
            z = z_all[start:start + batch_size].to(device)
            y = None if y_all is None else y_all[start:start + batch_size].to(device)
            out.append(to_uint8_rgb(G(z, y)))
    finally:
        G.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------- metrics


def metrics_from_images(fake: torch.Tensor, real: Any, eval_cfg: EvalConfig,
                        device: str | torch.device = "cpu", resolution: int | None = None,
                        endpoint_url: str | None = None, real_key: str | None = None,
                        progress: bool = False) -> dict[str, float]:
    """FID / KID / IS of uint8 (or [-1, 1] float) fake images against a real set.

    `real` is anything `prepare_real` takes, or a RealSet it returned. Returns the metrics
    named in `eval_cfg.metrics`: 'fid', 'kid' (+ 'kid_std'), 'is' (+ 'is_std'), as floats.
    """
    import torch_fidelity

    wanted = list(dict.fromkeys(eval_cfg.metrics))
    if not wanted:
        return {}
    fake = to_uint8_rgb(fake)
    resolution = resolution or fake.shape[-1]
    fake = _resize(fake, resolution)
    device = torch.device(device)
    weights = resolve_inception_weights(eval_cfg.inception_weights, progress=progress)
    wtag = weights_fingerprint(weights)
    binary = "fid" in wanted or "kid" in wanted
    n_fake = fake.shape[0]

    kwargs: dict[str, Any] = {
        "input1": ImageTensorDataset(fake),
        "cuda": device.type == "cuda",
        "batch_size": eval_cfg.batch_size,
        "feature_extractor": FEATURE_EXTRACTOR,
        "feature_extractor_weights_path": str(weights),
        # IS is on whenever FID/KID is, so the cached real feature set never depends on which
        # metrics were asked for (see module docstring); its cost is one linear layer.
        "isc": True,
        "fid": "fid" in wanted,
        "kid": "kid" in wanted,
        "isc_splits": max(1, min(10, n_fake // 2)),  # >= 2 images per split
        "save_cpu_ram": True,  # num_workers=0: our datasets are in-memory tensors
        "verbose": progress,
        "cache": False,
    }
    if binary:
        real_set = real if isinstance(real, RealSet) else prepare_real(
            real, eval_cfg.real_samples, resolution, eval_cfg.batch_size, endpoint_url,
            real_key, progress)
        key = real_cache_key(real_set.source_id, resolution, real_set.num_images, wtag)
        cache = RealStatsCache(eval_cfg.cache_dir)
        # Exact real count for KID's subset size: from the cache on a hit, else by loading the
        # set now (torch-fidelity would load it next anyway); a loader may skip corrupt samples.
        n_real = cache.count(key) if cache.has(key) else len(real_set.dataset)
        kwargs["input2"] = real_set.dataset
        kwargs.update(cache.fidelity_kwargs(key))
        kwargs["kid_subset_size"] = min(1000, n_fake, n_real)

    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        raw = torch_fidelity.calculate_metrics(**kwargs)

    out: dict[str, float] = {}
    if "fid" in wanted:
        out["fid"] = float(raw[torch_fidelity.KEY_METRIC_FID])
    if "kid" in wanted:
        out["kid"] = float(raw[torch_fidelity.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(raw[torch_fidelity.KEY_METRIC_KID_STD])
    if "is" in wanted:
        out["is"] = float(raw[torch_fidelity.KEY_METRIC_ISC_MEAN])
        out["is_std"] = float(raw[torch_fidelity.KEY_METRIC_ISC_STD])
    return out


def compute_metrics(generator: nn.Module, eval_cfg: EvalConfig, real: Any,
                    device: str | torch.device = "cpu", num_classes: int | None = None,
                    endpoint_url: str | None = None, real_key: str | None = None,
                    seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Generate `eval_cfg.num_samples` images with `generator` and score them against `real`.

    `real`: a data path (local / s3:// / http(s)://), a DataConfig, or any iterable of image
    batches ((x, y) or x; float in [-1, 1] or uint8). Real features are cached under
    `eval_cfg.cache_dir`; `real_key` names an in-memory set explicitly (default: hash of pixels).
    `num_classes` overrides the generator's (0 forces unconditional sampling). Returns a subset
    of {'fid', 'kid', 'kid_std', 'is', 'is_std'} following `eval_cfg.metrics`.
    """
    G = getattr(generator, "module", generator)
    resolution = int(getattr(getattr(G, "cfg", None), "image_size", 0)) or None
    # Fail on missing weights or a bad data path before spending minutes generating samples
    # (for shard paths this reads only the manifest; shards are read on a cache miss).
    resolve_inception_weights(eval_cfg.inception_weights, progress=progress)
    if resolution is not None and ("fid" in eval_cfg.metrics or "kid" in eval_cfg.metrics):
        real = prepare_real(real, eval_cfg.real_samples, resolution, eval_cfg.batch_size,
                            endpoint_url, real_key, progress)
    fake = generate_images(G, eval_cfg.num_samples, eval_cfg.batch_size, device, seed,
                           num_classes, progress)
    return metrics_from_images(fake, real, eval_cfg, device, resolution=fake.shape[-1],
                               endpoint_url=endpoint_url, real_key=real_key, progress=progress)
