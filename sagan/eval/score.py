"""FID, KID (and IS) of a generator: featurise with torch-fidelity's InceptionV3, score with
torch-fidelity's own metric functions.

Features are computed here rather than through `torch_fidelity.calculate_metrics` so that
evaluation can run on every rank of a training job: each rank generates and featurises its
share of `eval.num_samples` (and, on a cache miss, of the real set), the features are gathered
on rank 0, which scores them, and every rank gets the same numbers back. One process gets the
same numbers with world size 1 (the shares concatenate to the same sequence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sagan.config import EvalConfig
from sagan.eval.generate import generate_images, share
from sagan.eval.real import RealSet, RealStatsCache, prepare_real, real_cache_key, resize
from sagan.eval.real import to_uint8_rgb as _to_uint8_rgb
from sagan.eval.weights import (
    LOGITS_LAYER,
    POOL_LAYER,
    feature_extractor,
    require_classifier,
    resolve_inception_weights,
    weights_fingerprint,
)

KID_SUBSET_SIZE = 1000  # torch-fidelity's default; smaller sets use their own size


@torch.no_grad()
def featurize(images: torch.Tensor, extractor: nn.Module, batch_size: int = 64,
              device: str | torch.device = "cpu", progress: bool = False,
              desc: str = "Inception") -> dict[str, torch.Tensor]:
    """uint8 (N, 3, H, W) -> {layer: float32 (N, D) on CPU} for each of the extractor's layers."""
    from tqdm import tqdm

    layers = tuple(extractor.features_list)
    device = torch.device(device)
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device).contiguous(memory_format=fmt)
        for layer, f in zip(layers, extractor(x), strict=True):
            out[layer].append(f.float().cpu())
    width = {POOL_LAYER: 2048, LOGITS_LAYER: 1008}
    return {layer: torch.cat(parts) if parts else torch.empty(0, width[layer])
            for layer, parts in out.items()}


def scores(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | None,
           metrics: list[str]) -> dict[str, float]:
    """torch-fidelity's FID / KID / IS on ready features; keys follow `metrics`."""
    from torch_fidelity import metric_fid, metric_isc, metric_kid

    out: dict[str, float] = {}
    if "fid" in metrics:
        stats = [metric_fid.fid_features_to_statistics(f[POOL_LAYER]) for f in (fake, real)]
        out["fid"] = float(metric_fid.fid_statistics_to_metric(*stats, verbose=False)
                           [metric_fid.KEY_METRIC_FID])
    if "kid" in metrics:
        n = min(KID_SUBSET_SIZE, len(fake[POOL_LAYER]), len(real[POOL_LAYER]))
        kid = metric_kid.kid_features_to_metric(fake[POOL_LAYER], real[POOL_LAYER],
                                                kid_subset_size=n, verbose=False)
        out["kid"] = float(kid[metric_kid.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(kid[metric_kid.KEY_METRIC_KID_STD])
    if "is" in metrics:
        logits = fake[LOGITS_LAYER]
        isc = metric_isc.isc_features_to_metric(logits, splits=max(1, min(10, len(logits) // 2)))
        out["is"] = float(isc[metric_isc.KEY_METRIC_ISC_MEAN])
        out["is_std"] = float(isc[metric_isc.KEY_METRIC_ISC_STD])
    return out


# --------------------------------------------------------------------------- ranks


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(features: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor] | None:
    """Every rank's features concatenated in rank order, on rank 0 (None elsewhere)."""
    if world == 1:
        return features
    parts: list[Any] | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(features, parts, dst=0)
    if parts is None:
        return None
    return {layer: torch.cat([p[layer] for p in parts]) for layer in features}


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- entry points


def _check_metrics(metrics: list[str]) -> list[str]:
    bad = [m for m in metrics if m not in ("fid", "kid", "is")]
    if bad:
        raise ValueError(f"eval.metrics: unknown {bad}; choose from fid, kid, is")
    return list(dict.fromkeys(metrics))


def _score(fake_images: torch.Tensor, real: Any, eval_cfg: EvalConfig, device: torch.device,
           resolution: int, endpoint_url: str | None, real_key: str | None, progress: bool,
           rank: int, world: int) -> dict[str, float]:
    """Featurise this rank's fakes (and real share on a cache miss), gather, score on rank 0,
    broadcast. Every rank must call it (collectives)."""
    wanted = _check_metrics(eval_cfg.metrics)
    weights = resolve_inception_weights(eval_cfg.inception_weights, progress=progress)
    require_classifier(weights, wanted)
    layers = (POOL_LAYER, LOGITS_LAYER) if "is" in wanted else (POOL_LAYER,)
    extractor = feature_extractor(weights, device, layers)
    bs = eval_cfg.batch_size
    fake = _gather(featurize(fake_images, extractor, bs, device, progress,
                             "Inception (generated)"), world)
    real_features = None
    if "fid" in wanted or "kid" in wanted:
        real_set = prepare_real(real, eval_cfg.real_samples, resolution, bs, endpoint_url,
                                real_key, progress)
        key = real_cache_key(real_set.source_id, resolution, real_set.num_images,
                             weights_fingerprint(weights))
        cache = RealStatsCache(eval_cfg.cache_dir)
        if _broadcast(cache.has(key) if rank == 0 else None, world):
            real_features = cache.features(key) if rank == 0 else None
        else:
            mine = real_set.images()[share(real_set.num_images, rank, world)]
            feats = featurize(mine, extractor, bs, device, progress, "Inception (real)")
            gathered = _gather({POOL_LAYER: feats[POOL_LAYER]}, world)
            if rank == 0:
                cache.put(key, gathered)
                real_features = gathered[POOL_LAYER]
    result = None
    if rank == 0:
        real_dict = None if real_features is None else {POOL_LAYER: real_features}
        result = scores(fake, real_dict, wanted)
    return _broadcast(result, world)


def metrics_from_images(fake: torch.Tensor, real: Any, eval_cfg: EvalConfig,
                        device: str | torch.device = "cpu", resolution: int | None = None,
                        endpoint_url: str | None = None, real_key: str | None = None,
                        progress: bool = False) -> dict[str, float]:
    """FID / KID / IS of ready images (uint8, or float in [-1, 1]) against `real` (anything
    `prepare_real` takes), in this process."""
    fake = _to_uint8_rgb(fake)
    resolution = resolution or fake.shape[-1]
    return _score(resize(fake, resolution), real, eval_cfg, torch.device(device), resolution,
                  endpoint_url, real_key, progress, 0, 1)


def compute_metrics(generator: nn.Module, eval_cfg: EvalConfig, real: Any,
                    device: str | torch.device = "cpu", num_classes: int | None = None,
                    endpoint_url: str | None = None, real_key: str | None = None,
                    seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Generate `eval_cfg.num_samples` images and score them against `real` (a data path, a
    DataConfig, a RealSet or an iterable of image batches); returns a subset of {'fid', 'kid',
    'kid_std', 'is', 'is_std'} following `eval_cfg.metrics`.

    Inside an initialised torch.distributed group every rank must call this with the same
    generator weights: each does its share and all get the same result."""
    rank, world = _world()
    G = getattr(generator, "module", generator)
    resolution = int(G.cfg.image_size)
    device = torch.device(device)
    wanted = _check_metrics(eval_cfg.metrics)
    # fail on missing weights or a bad data path before minutes of sampling
    require_classifier(resolve_inception_weights(eval_cfg.inception_weights, progress=progress),
                       wanted)
    if "fid" in wanted or "kid" in wanted:
        real = prepare_real(real, eval_cfg.real_samples, resolution, eval_cfg.batch_size,
                            endpoint_url, real_key, progress)
    fake = generate_images(G, eval_cfg.num_samples, eval_cfg.batch_size, device, seed,
                           num_classes, progress, rank, world)
    return _score(fake, real, eval_cfg, device, resolution, endpoint_url, real_key, progress,
                  rank, world)


__all__ = ["RealSet", "compute_metrics", "featurize", "metrics_from_images", "scores"]
