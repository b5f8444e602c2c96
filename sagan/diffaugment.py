"""DiffAugment (Zhao et al., NeurIPS 2020): differentiable augmentation of every image D sees.

With little data, D memorises the training set and G stops learning. Augmenting only the real
images would teach G to produce augmented images; DiffAugment applies the same random family to
real and fake images, in both the D and the G step, and keeps it differentiable so G's gradient
flows through it. Policies, as in the paper's code: `color` (brightness, saturation, contrast),
`translation` (shift by up to 1/8 of the size, zero fill), `cutout` (a zeroed square of half
the size). Randomness comes from the caller's generator: per rank, so ranks augment differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sagan.config import DIFFAUGMENT_POLICIES


def _rand(x: torch.Tensor, *shape: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=x.device, dtype=x.dtype)


def color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness +U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5), per image."""
    b = x.shape[0]
    x = x + (_rand(x, b, 1, 1, 1, generator=generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, b, 1, 1, 1, generator=generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, b, 1, 1, 1, generator=generator) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by an integer offset in [-ratio*size, ratio*size] per axis; zero fill."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), generator=generator, device=x.device)
    iy, ix = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                            indexing="ij")
    # output pixel (i, j) reads padded input (i - dy + 1, j - dx + 1): pad 1 is the zero border
    gy = torch.clamp(iy[None] - dy + 1, 0, h + 1)
    gx = torch.clamp(ix[None] - dx + 1, 0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    flat = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], gy, gx]
    return flat.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a square of ratio*size at a random centre (may overhang the border), per image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), generator=generator, device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), generator=generator, device=x.device)
    dy = torch.arange(h, device=x.device)[None, :, None] - oy + ch // 2  # row inside square
    dx = torch.arange(w, device=x.device)[None, None, :] - ox + cw // 2
    inside = (dy >= 0) & (dy < ch) & (dx >= 0) & (dx < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": color, "translation": translation, "cutout": cutout}
assert set(_OPS) == set(DIFFAUGMENT_POLICIES)  # the names train.diffaugment takes (sagan.config)


def diff_augment(x: torch.Tensor, policy: Sequence[str],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the policies in order (each image its own random draw); `policy=[]` is identity."""
    for name in policy:
        x = _OPS[name](x, generator=generator)
    return x
