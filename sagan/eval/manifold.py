"""Fidelity and diversity as separate numbers: precision / recall (Kynkaanniemi et al. 2019)
and density / coverage (Naeem et al. 2020), on the same Inception pool3 features as FID.

FID folds "are the samples realistic" and "do they cover the real distribution" into one
distance; a model that drops modes and one that draws blurry samples can score the same. These
estimate each side from k-nearest-neighbour balls around feature vectors:

- precision: share of generated samples inside the real manifold (the union of each real
  sample's ball to its k-th real neighbour); recall: share of real samples inside the
  generated manifold. k = 3 as in the paper; torch-fidelity 0.4's `prc` implementation.
- density: how many real balls contain each generated sample, divided by k, averaged (about 1
  when the distributions match, robust to real outliers); coverage: share of real samples
  whose ball contains at least one generated sample. k = 5 as in the paper; the authors' MIT
  `prdc` package.

Both take about a second on 1,000 x 1,000 samples (pairwise distances in 2,048-d).
"""

from __future__ import annotations

import contextlib
import io

import torch

from sagan.eval.names import DC_K, PRC_K


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PRC_K) -> dict[str, float]:
    """Improved precision and recall of `fake` against `real` features (N, D)."""
    from torch_fidelity import metric_prc

    out = metric_prc.prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k,
                                            prc_batch_size=10000, save_cpu_ram=False,
                                            verbose=False)
    return {"precision": float(out[metric_prc.KEY_METRIC_PRECISION]),
            "recall": float(out[metric_prc.KEY_METRIC_RECALL])}


def density_coverage(fake: torch.Tensor, real: torch.Tensor, k: int = DC_K) -> dict[str, float]:
    """Density and coverage of `fake` against `real` features (N, D)."""
    import prdc

    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = prdc.compute_prdc(real_features=real.float().numpy(),
                                fake_features=fake.float().numpy(), nearest_k=k)
    return {"density": float(out["density"]), "coverage": float(out["coverage"])}


def library_versions() -> dict[str, str]:
    """The packages whose code computes the scores, for the protocol logged with them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch-fidelity", "prdc"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out
