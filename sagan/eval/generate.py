"""Generated images for evaluation: a fixed, seeded sequence of (z, y), split over ranks.

The sequence depends only on the seed and the sample count, never on the number of ranks:
rank r generates the r-th contiguous share, and the shares concatenated in rank order are the
images one process would generate, so FID does not change when the cluster does.
"""

from __future__ import annotations

import torch
from torch import nn

from sagan.eval.real import to_uint8_rgb
from sagan.truncation import check_truncation, truncate  # noqa: F401 - re-exported by sagan.eval


def share(n: int, rank: int, world: int) -> slice:
    """The contiguous part of `n` items that `rank` of `world` handles (sizes differ by <= 1)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def eval_inputs(z_dim: int, num_images: int, num_classes: int, seed: int = 0,
                truncation: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Standard-normal z (truncated at `truncation`, see `truncate`) and balanced class
    labels (each class num_images/K times, shuffled), from a CPU generator: the same numbers on
    CPU and GPU, and lower FID variance against a balanced real set than uniform labels."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, z_dim, generator=rng)
    y = None
    if num_classes > 0:
        y = (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=rng)]
    return truncate(z, truncation, seed), y


@torch.no_grad()
def generate_images(generator: nn.Module, num_images: int, batch_size: int = 64,
                    device: str | torch.device = "cpu", seed: int = 0,
                    num_classes: int | None = None, progress: bool = False,
                    rank: int = 0, world: int = 1,
                    truncation: float | None = None) -> torch.Tensor:
    """This rank's share of `num_images` samples of G as uint8 (n, 3, S, S) on CPU.

    G runs in eval mode (BN running stats, no SN power iteration) and its previous mode is
    restored, since the trainer calls this mid-training."""
    from tqdm import tqdm

    G = getattr(generator, "module", generator)  # DDP wrapper
    device = torch.device(device)
    k = G.num_classes if num_classes is None else num_classes
    z_all, y_all = eval_inputs(G.z_dim, num_images, k, seed, truncation)
    part = share(num_images, rank, world)
    z_all = z_all[part]
    y_all = None if y_all is None else y_all[part]
    was_training = G.training
    G.eval()
    out = []
    try:
        for start in tqdm(range(0, len(z_all), batch_size), desc="generating", unit="batch",
                          disable=not progress, leave=False):
            z = z_all[start:start + batch_size].to(device)
            y = None if y_all is None else y_all[start:start + batch_size].to(device)
            out.append(to_uint8_rgb(G(z, y)))
    finally:
        G.train(was_training)
    if not out:
        return torch.empty(0, 3, G.cfg.image_size, G.cfg.image_size, dtype=torch.uint8)
    return torch.cat(out)
