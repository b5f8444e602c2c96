"""GAN losses. Hinge is SAGAN's (and BigGAN's) default; non-saturating ('ns') is the classic
alternative. Each returns a scalar tensor; D losses take real and fake logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def d_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def g_hinge(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def d_ns(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_ns(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()


LOSSES: dict[str, tuple[Callable, Callable]] = {"hinge": (d_hinge, g_hinge), "ns": (d_ns, g_ns)}


def get_losses(name: str) -> tuple[Callable, Callable]:
    """(d_loss(real, fake), g_loss(fake)) for a loss name from the config."""
    if name not in LOSSES:
        raise ValueError(f"train.loss: unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name]
