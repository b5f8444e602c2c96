"""SAGAN ResNet Generator and projection Discriminator for 32, 64 and 128 px.

Channel widths per resolution follow BigGAN-PyTorch's `G_arch`/`D_arch` tables (the 128 px table is
the official SAGAN one: G 16-16-8-4-2-1 x ch, D 1-2-4-8-16-16 x ch); `model.g_mults`/`d_mults`
replace them. Attention goes after the block
whose *output* has the listed resolution, e.g. `g_attention: [64]` at 128 px puts it on the 64x64
map, as in the paper's best model (feat64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sagan.config import ModelConfig, d_resolutions, g_resolutions
from sagan.layers import ConditionalBatchNorm2d, SelfAttention, sn_conv2d, sn_embedding, sn_linear

# Channel multipliers of ch: G at 4x4 then after each up-block; D after each down-block + final.
G_MULTS = {32: [4, 4, 4, 4], 64: [16, 8, 4, 2, 1], 128: [16, 16, 8, 4, 2, 1]}
D_MULTS = {32: [4, 4, 4, 4], 64: [1, 2, 4, 8, 16], 128: [1, 2, 4, 8, 16, 16]}


def _attention(cfg: ModelConfig, channels: int) -> SelfAttention:
    return SelfAttention(channels, heads=cfg.attention_heads, pooled=cfg.attention_pooled,
                         gamma_init=cfg.gamma_init, gamma_learnable=cfg.gamma_learnable)


class GBlock(nn.Module):
    """(c)BN -> ReLU -> 2x nearest up -> SN conv3x3 -> (c)BN -> ReLU -> SN conv3x3, + 1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int, num_classes: int, cbn: str = "sn"):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_ch, num_classes, form=cbn)
        self.conv1 = sn_conv2d(in_ch, out_ch, 3)
        self.bn2 = ConditionalBatchNorm2d(out_ch, num_classes, form=cbn)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3)
        self.skip = sn_conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1.forward_upsampled(F.relu(self.bn1(x, y)))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + self.skip.forward_upsampled(x)


class DBlock(nn.Module):
    """ReLU -> SN conv3x3 -> ReLU -> SN conv3x3 -> avgpool, + (1x1 conv, avgpool) skip.

    `preactivation=False` is the official 'optimized' first block (no ReLU on the raw image, skip
    pools before its 1x1 conv)."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, preactivation: bool):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = sn_conv2d(in_ch, out_ch, 3)
        self.conv2 = sn_conv2d(out_ch, out_ch, 3)
        self.skip = sn_conv2d(in_ch, out_ch, 1) if (downsample or in_ch != out_ch) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(F.relu(x) if self.preactivation else x))
        h = self.conv2.forward_pooled(h) if self.downsample else self.conv2(h)
        s = x
        if self.preactivation:
            if self.skip is not None:
                s = self.skip.forward_pooled(s) if self.downsample else self.skip(s)
            elif self.downsample:
                s = F.avg_pool2d(s, 2)
        else:
            if self.downsample:
                s = F.avg_pool2d(s, 2)
            if self.skip is not None:
                s = self.skip(s)
        return h + s


class Generator(nn.Module):
    """z (B, z_dim), y (B,) long or None -> image (B, channels, S, S) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mults = cfg.g_mults or G_MULTS[cfg.image_size]
        chans = [cfg.g_ch * m for m in mults]
        self.num_classes, self.z_dim = cfg.num_classes, cfg.z_dim
        self.resolutions = g_resolutions(cfg.image_size)
        self.linear = sn_linear(cfg.z_dim, 4 * 4 * chans[0])
        self.blocks = nn.ModuleList(
            GBlock(chans[i], chans[i + 1], cfg.num_classes, cfg.cbn)
            for i in range(len(chans) - 1))
        self.block_res = [4 * 2 ** (i + 1) for i in range(len(self.blocks))]
        self.attention = nn.ModuleDict(
            {str(r): _attention(cfg, chans[self.block_res.index(r) + 1])
             for r in cfg.g_attention})
        self.out_bn = nn.BatchNorm2d(chans[-1])
        self.out_conv = sn_conv2d(chans[-1], cfg.channels, 3)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None,
                return_attention: bool = False):
        if self.num_classes > 0 and y is None:
            raise ValueError(f"Generator: y is required (num_classes={self.num_classes})")
        y = y if self.num_classes > 0 else None
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        maps: dict[int, torch.Tensor] = {}
        for block, res in zip(self.blocks, self.block_res, strict=True):
            h = block(h, y)
            if str(res) in self.attention:
                if return_attention:
                    h, maps[res] = self.attention[str(res)](h, return_attention=True)
                else:
                    h = self.attention[str(res)](h)
        x = torch.tanh(self.out_conv(F.relu(self.out_bn(h))))
        return (x, maps) if return_attention else x

    def sample_inputs(
        self, n: int, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standard-normal z and uniform class ids (None when unconditional)."""
        z = torch.randn(n, self.z_dim, generator=generator, device=device)
        y = (torch.randint(0, self.num_classes, (n,), generator=generator, device=device)
             if self.num_classes > 0 else None)
        return z, y

    @torch.no_grad()
    def standing_statistics(self, num_samples: int, batch_size: int = 100, seed: int = 0) -> None:
        """Replace every BN's running statistics by their average over `num_samples` fresh
        samples of *this* generator (BigGAN's "standing stats"), then leave it in eval mode.

        Why: the EMA generator is an average of weights, but the running statistics it would
        otherwise use were collected by the raw G, whose activations differ; on the quickstart
        the mismatch cost ~5 FID (docs/RESULTS.md). Seeded, so every rank gets the same numbers.
        Only the BN layers run in training mode: spectral norm's u/v are not iterated."""
        self.eval()
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        rng = torch.Generator().manual_seed(seed)
        device = next(self.parameters()).device
        try:
            for start in range(0, num_samples, batch_size):
                z, y = self.sample_inputs(min(batch_size, num_samples - start), rng)
                self(z.to(device), None if y is None else y.to(device))
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
            self.eval()


class Discriminator(nn.Module):
    """x (B, channels, S, S), y (B,) or None -> logits (B,), with the projection term."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mults = cfg.d_mults or D_MULTS[cfg.image_size]
        chans = [cfg.d_ch * m for m in mults]
        n_down = int(math.log2(cfg.image_size // 4))
        self.num_classes = cfg.num_classes
        blocks, res, in_ch = [], [], cfg.channels
        for i, out_ch in enumerate(chans):
            down = i < n_down
            blocks.append(DBlock(in_ch, out_ch, downsample=down, preactivation=i > 0))
            res.append(cfg.image_size // 2 ** (i + 1) if down else 4)
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.block_res = res
        valid = set(d_resolutions(cfg.image_size))
        self.attention = nn.ModuleDict(
            {str(r): _attention(cfg, chans[res.index(r)]) for r in cfg.d_attention if r in valid})
        self.linear = sn_linear(chans[-1], 1)
        self.embed = sn_embedding(cfg.num_classes, chans[-1]) if cfg.num_classes > 0 else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes > 0 and y is None:
            raise ValueError(f"Discriminator: y is required (num_classes={self.num_classes})")
        h = x
        attended: set[str] = set()
        for block, res in zip(self.blocks, self.block_res, strict=True):
            h = block(h)
            key = str(res)
            if key in self.attention and key not in attended:  # final 4x4 block shares res 4
                h = self.attention[key](h)
                attended.add(key)
        h = F.relu(h).sum(dim=(2, 3))  # global sum pooling, as in the official code
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


def unwrap(net: nn.Module) -> nn.Module:
    """The network under a DDP or AveragedModel wrapper (`.module`) and/or torch.compile's
    (`._orig_mod`), e.g. to read its attention layers or sample from it."""
    while True:
        inner = getattr(net, "_orig_mod", None) or getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def attention_layers(G: nn.Module, D: nn.Module) -> dict[str, SelfAttention]:
    """Name -> attention block for both nets, e.g. {'g_attn32': ..., 'd_attn16': ...}."""
    out = {}
    for prefix, net in (("g", G), ("d", D)):
        net = unwrap(net)
        for res, layer in net.attention.items():
            out[f"{prefix}_attn{res}"] = layer
    return out
