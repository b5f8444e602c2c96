"""The metrics of `sagan.eval.names` for a generator: featurise with torch-fidelity's
InceptionV3, score with torch-fidelity's own functions (FID, KID, IS, precision/recall), the
`prdc` package (density/coverage) and per-class FID (ifid).

Features are computed here rather than through `torch_fidelity.calculate_metrics` so that
evaluation can run on every rank of a training job: each rank generates and featurises its
share of `eval.num_samples` (and, on a cache miss, of the real set), the features are gathered
on rank 0, which scores them, and every rank gets the same numbers back. One process gets the
same numbers with world size 1 (the shares concatenate to the same sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sagan.config import EvalConfig
from sagan.eval.generate import eval_inputs, generate_images, share
from sagan.eval.manifold import density_coverage, precision_recall
from sagan.eval.names import IFID_CLASS_PREFIX, METRICS, check_metrics
from sagan.eval.protocol import evaluation_protocol
from sagan.eval.real import (
    RealDataError,
    RealSet,
    RealStatsCache,
    prepare_real,
    real_cache_key,
    resize,
)
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


def _fid(fake: torch.Tensor, real: torch.Tensor) -> float:
    from torch_fidelity import metric_fid

    stats = [metric_fid.fid_features_to_statistics(f) for f in (fake, real)]
    return float(metric_fid.fid_statistics_to_metric(*stats, verbose=False)
                 [metric_fid.KEY_METRIC_FID])


def intra_class_fid(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
                    real_labels: torch.Tensor) -> dict[str, float]:
    """Intra-class FID (StudioGAN's iFID): FID of each class's generated images against that
    class's real images, `ifid` their mean and `ifid/<c>` each class. Plain FID cannot see a
    conditional model that draws good images of the wrong class; this can. Classes with fewer
    than 2 images on either side are skipped (FID needs a covariance)."""
    per_class = {}
    for c in sorted(set(fake_labels.tolist()) & set(real_labels.tolist())):
        f, r = fake[fake_labels == c], real[real_labels == c]
        if len(f) >= 2 and len(r) >= 2:
            per_class[f"{IFID_CLASS_PREFIX}{c}"] = _fid(f, r)
    if not per_class:
        raise RealDataError("ifid: no class has 2 or more images on both sides")
    return {"ifid": sum(per_class.values()) / len(per_class), **per_class}


def scores(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | None,
           metrics: list[str], fake_labels: torch.Tensor | None = None,
           real_labels: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics of `sagan.eval.names` on ready features; keys follow `metrics` (registry
    order). `ifid` needs the class labels of both sides."""
    from torch_fidelity import metric_isc, metric_kid

    wanted = check_metrics(metrics)
    out: dict[str, float] = {}
    f = fake[POOL_LAYER]
    r = None if real is None else real[POOL_LAYER]
    if "fid" in wanted:
        out["fid"] = _fid(f, r)
    if "kid" in wanted:
        n = min(KID_SUBSET_SIZE, len(f), len(r))
        kid = metric_kid.kid_features_to_metric(f, r, kid_subset_size=n, verbose=False)
        out["kid"] = float(kid[metric_kid.KEY_METRIC_KID_MEAN])
        out["kid_std"] = float(kid[metric_kid.KEY_METRIC_KID_STD])
    if "is" in wanted:
        logits = fake[LOGITS_LAYER]
        isc = metric_isc.isc_features_to_metric(logits, splits=max(1, min(10, len(logits) // 2)))
        out["is"] = float(isc[metric_isc.KEY_METRIC_ISC_MEAN])
        out["is_std"] = float(isc[metric_isc.KEY_METRIC_ISC_STD])
    if "prc" in wanted:
        out.update(precision_recall(f, r))
    if "dc" in wanted:
        out.update(density_coverage(f, r))
    if "ifid" in wanted:
        if fake_labels is None or real_labels is None:
            raise RealDataError("eval.metrics: 'ifid' needs a conditional generator and a "
                                "labelled real set (shards with classes)")
        out.update(intra_class_fid(f, fake_labels, r, real_labels))
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

LABELS = "labels"  # the real set's class labels, cached next to its features (for ifid)


@dataclass
class Evaluation:
    """Scores and the protocol they were measured under (`sagan.eval.protocol`)."""

    scores: dict[str, float]
    protocol: dict[str, str]


def _real_features(real_set: RealSet, extractor: nn.Module, eval_cfg: EvalConfig,
                   device: torch.device, resolution: int, fingerprint: str, with_labels: bool,
                   progress: bool, rank: int, world: int) -> dict[str, torch.Tensor] | None:
    """Rank 0: the real set's pool3 features (and labels) from the cache, or featurised by all
    ranks (their shares gathered) and cached. None on other ranks."""
    key = real_cache_key(real_set.source_id, resolution, real_set.num_images, fingerprint)
    cache = RealStatsCache(eval_cfg.cache_dir)
    layers = (POOL_LAYER, LABELS) if with_labels else (POOL_LAYER,)
    if _broadcast(cache.has(key, layers) if rank == 0 else None, world):
        return {layer: cache.features(key, layer) for layer in layers} if rank == 0 else None
    part = share(real_set.num_images, rank, world)
    mine = {POOL_LAYER: featurize(real_set.images()[part], extractor, eval_cfg.batch_size,
                                  device, progress, "Inception (real)")[POOL_LAYER]}
    labels = real_set.labels()
    if labels is not None:
        mine[LABELS] = labels[part].float()
    gathered = _gather(mine, world)
    if rank != 0:
        return None
    cache.put(key, gathered)
    if with_labels and LABELS not in gathered:
        raise RealDataError(f"eval.metrics: 'ifid' needs class labels; real set "
                            f"'{real_set.name}' has none")
    return gathered


def _score(fake_images: torch.Tensor, real: Any, eval_cfg: EvalConfig, device: torch.device,
           resolution: int, endpoint_url: str | None, real_key: str | None, progress: bool,
           rank: int, world: int, fake_labels: torch.Tensor | None = None,
           seed: int | None = None, truncation: float | None = None) -> Evaluation:
    """Featurise this rank's fakes (and real share on a cache miss), gather, score on rank 0,
    broadcast. Every rank must call it (collectives)."""
    wanted = check_metrics(eval_cfg.metrics)
    weights = resolve_inception_weights(eval_cfg.inception_weights, progress=progress)
    require_classifier(weights, wanted)
    layers = (POOL_LAYER, LOGITS_LAYER) if "is" in wanted else (POOL_LAYER,)
    extractor = feature_extractor(weights, device, layers, eval_cfg.runtime, eval_cfg.cache_dir)
    fake = _gather(featurize(fake_images, extractor, eval_cfg.batch_size, device, progress,
                             "Inception (generated)"), world)
    real_set, real_features = None, None
    if any(METRICS[m].needs_real for m in wanted):
        real_set = prepare_real(real, eval_cfg.real_samples, resolution, eval_cfg.batch_size,
                                endpoint_url, real_key, progress)
        real_features = _real_features(real_set, extractor, eval_cfg, device, resolution,
                                       weights_fingerprint(weights), "ifid" in wanted,
                                       progress, rank, world)
    result = None
    if rank == 0:
        if "ifid" in wanted and fake_labels is None:
            raise RealDataError("eval.metrics: 'ifid' needs a conditional generator")
        real_labels = None
        if real_features is not None and LABELS in real_features:
            real_labels = real_features.pop(LABELS).long()
        result = scores(fake, real_features, wanted, fake_labels, real_labels)
    protocol = evaluation_protocol(wanted, weights, real_set, resolution,
                                   num_generated=int(eval_cfg.num_samples if world > 1 else
                                                     len(fake_images)),
                                   seed=seed, truncation=truncation,
                                   runtime=extractor.runtime)
    return Evaluation(_broadcast(result, world), protocol)


def metrics_from_images(fake: torch.Tensor, real: Any, eval_cfg: EvalConfig,
                        device: str | torch.device = "cpu", resolution: int | None = None,
                        endpoint_url: str | None = None, real_key: str | None = None,
                        progress: bool = False, fake_labels: torch.Tensor | None = None
                        ) -> dict[str, float]:
    """The metrics of ready images (uint8, or float in [-1, 1]) against `real` (anything
    `prepare_real` takes), in this process; `fake_labels` (N,) for ifid."""
    fake = _to_uint8_rgb(fake)
    resolution = resolution or fake.shape[-1]
    return _score(resize(fake, resolution), real, eval_cfg, torch.device(device), resolution,
                  endpoint_url, real_key, progress, 0, 1, fake_labels).scores


def evaluate_generator(generator: nn.Module, eval_cfg: EvalConfig, real: Any,
                       device: str | torch.device = "cpu", num_classes: int | None = None,
                       endpoint_url: str | None = None, real_key: str | None = None,
                       seed: int = 0, progress: bool = False,
                       truncation: float | None = None) -> Evaluation:
    """Generate `eval_cfg.num_samples` images (z truncated at `truncation` when set) and score
    them against `real` (a data path, a DataConfig, a RealSet or an iterable of image
    batches): the scores of `eval_cfg.metrics` (keys in `sagan.eval.names`) and the protocol.

    Inside an initialised torch.distributed group every rank must call this with the same
    generator weights: each does its share and all get the same result."""
    rank, world = _world()
    G = getattr(generator, "module", generator)
    resolution = int(G.cfg.image_size)
    device = torch.device(device)
    wanted = check_metrics(eval_cfg.metrics)
    # fail on missing weights or a bad data path before minutes of sampling
    require_classifier(resolve_inception_weights(eval_cfg.inception_weights, progress=progress),
                       wanted)
    if any(METRICS[m].needs_real for m in wanted):
        real = prepare_real(real, eval_cfg.real_samples, resolution, eval_cfg.batch_size,
                            endpoint_url, real_key, progress)
    k = G.num_classes if num_classes is None else num_classes
    if "ifid" in wanted and k == 0:
        raise RealDataError("eval.metrics: 'ifid' needs a conditional generator (this one has "
                            "no classes)")
    fake_labels = eval_inputs(G.z_dim, eval_cfg.num_samples, k, seed)[1]
    fake = generate_images(G, eval_cfg.num_samples, eval_cfg.batch_size, device, seed,
                           num_classes, progress, rank, world, truncation)
    return _score(fake, real, eval_cfg, device, resolution, endpoint_url, real_key, progress,
                  rank, world, fake_labels, seed, truncation)


def compute_metrics(generator: nn.Module, eval_cfg: EvalConfig, real: Any,
                    device: str | torch.device = "cpu", num_classes: int | None = None,
                    endpoint_url: str | None = None, real_key: str | None = None,
                    seed: int = 0, progress: bool = False,
                    truncation: float | None = None) -> dict[str, float]:
    """`evaluate_generator`'s scores alone: a subset of the keys in `sagan.eval.names`
    following `eval_cfg.metrics`."""
    return evaluate_generator(generator, eval_cfg, real, device, num_classes, endpoint_url,
                              real_key, seed, progress, truncation).scores


__all__ = ["Evaluation", "RealSet", "compute_metrics", "evaluate_generator", "featurize",
           "intra_class_fid", "metrics_from_images", "scores"]
