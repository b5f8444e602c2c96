"""Evaluation: FID, KID, IS, precision/recall, density/coverage and intra-class FID on the
standard Inception features, distributed over ranks, each score with its protocol.

    from sagan.eval import compute_metrics
    scores = compute_metrics(G_ema, cfg.eval, real=cfg.eval.real_path or cfg.data.path)

One file per job: `names` (the metric registry), `weights` (which Inception network, offline
conversion), `real` (the real set and its feature cache), `generate` (fixed-seed, optionally
truncated samples split over ranks), `score` (featurise, gather, score), `manifold`
(precision/recall, density/coverage), `protocol` (what a score was measured under).
docs/EVALUATION.md has the details.
"""

from sagan.eval.generate import check_truncation, eval_inputs, generate_images, share, truncate
from sagan.eval.manifold import density_coverage, precision_recall
from sagan.eval.names import METRICS, check_metrics, score_keys
from sagan.eval.protocol import comparable, evaluation_protocol
from sagan.eval.real import (
    RealDataError,
    RealSet,
    RealStatsCache,
    collect_images,
    prepare_real,
    real_cache_key,
    to_uint8_rgb,
)
from sagan.eval.score import (
    Evaluation,
    compute_metrics,
    evaluate_generator,
    featurize,
    intra_class_fid,
    metrics_from_images,
    scores,
)
from sagan.eval.weights import (
    InceptionWeightsError,
    convert_fid_helper,
    feature_extractor,
    resolve_inception_weights,
    weights_fingerprint,
)

__all__ = [
    "METRICS",
    "Evaluation",
    "InceptionWeightsError",
    "RealDataError",
    "RealSet",
    "RealStatsCache",
    "check_metrics",
    "check_truncation",
    "collect_images",
    "comparable",
    "density_coverage",
    "evaluate_generator",
    "evaluation_protocol",
    "compute_metrics",
    "convert_fid_helper",
    "eval_inputs",
    "feature_extractor",
    "featurize",
    "generate_images",
    "intra_class_fid",
    "metrics_from_images",
    "precision_recall",
    "prepare_real",
    "real_cache_key",
    "resolve_inception_weights",
    "score_keys",
    "scores",
    "share",
    "to_uint8_rgb",
    "truncate",
    "weights_fingerprint",
]
