"""Evaluation: FID / KID (and IS) on the standard Inception features, distributed over ranks.

    from sagan.eval import compute_metrics
    scores = compute_metrics(G_ema, cfg.eval, real=cfg.eval.real_path or cfg.data.path)

One file per job: `weights` (which Inception network, offline conversion), `real` (the real
set and its feature cache), `generate` (fixed-seed samples split over ranks), `score`
(featurise, gather, torch-fidelity's metrics). docs/EVALUATION.md has the details.
"""

from sagan.eval.generate import eval_inputs, generate_images, share
from sagan.eval.real import (
    RealDataError,
    RealSet,
    RealStatsCache,
    collect_images,
    prepare_real,
    real_cache_key,
    to_uint8_rgb,
)
from sagan.eval.score import compute_metrics, featurize, metrics_from_images, scores
from sagan.eval.weights import (
    InceptionWeightsError,
    convert_fid_helper,
    feature_extractor,
    resolve_inception_weights,
    weights_fingerprint,
)

__all__ = [
    "InceptionWeightsError",
    "RealDataError",
    "RealSet",
    "RealStatsCache",
    "collect_images",
    "compute_metrics",
    "convert_fid_helper",
    "eval_inputs",
    "feature_extractor",
    "featurize",
    "generate_images",
    "metrics_from_images",
    "prepare_real",
    "real_cache_key",
    "resolve_inception_weights",
    "scores",
    "share",
    "to_uint8_rgb",
    "weights_fingerprint",
]
