"""The protocol behind a score: everything that must be equal for two numbers to be compared.

An FID of 23 against 1,000 test images and one of 12 against 50,000 training images are not
the same measurement, nor are two FIDs from different Inception weights, resize paths or
library versions. Every score is logged with this dict (run params and model-version tags,
`protocol.*`), and `protocol.id` hashes the fields that change the numbers, so "same id" means
"comparable" at a glance.
"""

from __future__ import annotations

import hashlib
import os

from sagan.eval.manifold import library_versions
from sagan.eval.names import DC_K, PRC_K
from sagan.eval.real import RealSet
from sagan.eval.weights import FEATURE_EXTRACTOR, POOL_LAYER, weights_fingerprint

PREFIX = "protocol."
INCEPTION_SIZE = 299  # torch-fidelity's InceptionV3 resizes every input to this (bilinear)

# not part of `protocol.id`: they say which samples were drawn, not how they were measured;
# the runtime's features equal torch's to <= 1e-4 relative (checked each time it is built)
_NOT_IN_ID = ("seed", "metrics", "id", "runtime")


def evaluation_protocol(metrics: list[str], weights: str | os.PathLike, real_set: RealSet | None,
                        resolution: int, num_generated: int, seed: int | None = None,
                        truncation: float | None = None, runtime: str = "torch"
                        ) -> dict[str, str]:
    """`protocol.<field>` -> value (strings, as MLflow params and tags want)."""
    libs = library_versions()
    fields = {
        "features": f"{FEATURE_EXTRACTOR} pool3 ({POOL_LAYER}-d)",
        "weights_fingerprint": weights_fingerprint(weights),
        "real_set": real_set.name if real_set else "none",
        "real_digest": real_set.source_id if real_set else "none",
        "real_split": (real_set.description or "unknown") if real_set else "none",
        "real_count": str(real_set.num_images) if real_set else "0",
        "generated_count": str(int(num_generated)),
        "truncation": "none" if truncation is None else f"{float(truncation):g}",
        "resize": f"both sets at {resolution} px (real: antialiased bilinear when its size "
                  f"differs), then bilinear to {INCEPTION_SIZE} px inside torch-fidelity",
        "library": f"torch-fidelity {libs['torch-fidelity']}"
                   + (f", prdc {libs['prdc']}" if "dc" in metrics else ""),
        "runtime": runtime,
        "k": f"precision/recall {PRC_K}, density/coverage {DC_K}",
        "seed": "none" if seed is None else str(seed),
        "metrics": ",".join(metrics),
    }
    digest = hashlib.sha256(repr(sorted((k, v) for k, v in fields.items()
                                        if k not in _NOT_IN_ID)).encode()).hexdigest()[:12]
    fields["id"] = digest
    return {PREFIX + k: v for k, v in fields.items()}


def comparable(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The protocol fields in which two scores' protocols differ (empty: comparable)."""
    keys = sorted(k for k in {*a, *b} if k.removeprefix(PREFIX) not in _NOT_IN_ID)
    return [k.removeprefix(PREFIX) for k in keys if a.get(k) != b.get(k)]
