"""SAGAN building blocks: spectrally normalised layers, self-attention, conditional batch norm.

Spectral norm is torch's own parametrization (`nn.utils.parametrizations.spectral_norm`, one power
iteration per training-mode forward), applied to every conv/linear/embedding in G and D as in the
official SAGAN code (G's first linear and last conv included; see README "Model").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

SN_EPS = 1e-6


def sn_conv2d(in_ch: int, out_ch: int, kernel_size: int = 3, padding: int | None = None,
              bias: bool = True) -> nn.Conv2d:
    """Spectrally normalised Conv2d ('same' padding by default)."""
    pad = kernel_size // 2 if padding is None else padding
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=pad, bias=bias)
    nn.init.xavier_uniform_(conv.weight)
    if bias:
        nn.init.zeros_(conv.bias)
    return spectral_norm(conv, eps=SN_EPS)


def sn_linear(in_f: int, out_f: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.xavier_uniform_(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return spectral_norm(lin, eps=SN_EPS)


def sn_embedding(num: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(num, dim)
    nn.init.xavier_uniform_(emb.weight)
    return spectral_norm(emb, eps=SN_EPS)


def refresh_spectral_norm(module: nn.Module, iterations: int = 20) -> None:
    """Run extra power iterations on every SN weight of `module` (e.g. an EMA copy whose u/v
    vectors were estimated for different weights) so that eval-mode sigma is accurate."""
    was_training = module.training
    module.train()
    with torch.no_grad():
        for m in module.modules():
            if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                for _ in range(iterations):
                    _ = m.weight
    module.train(was_training)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose per-channel gain and bias come from the class label.

    gain = 1 + SN-embedding(y), bias = SN-embedding(y): the `1 +` keeps the layer an ordinary BN
    at init however the (unit-spectral-norm) embeddings start. With num_classes == 0 it is a plain
    affine BatchNorm2d, so G needs a single code path.
    """

    def __init__(self, num_features: int, num_classes: int, momentum: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(num_features, affine=num_classes == 0, momentum=momentum)
        if num_classes > 0:
            self.gain = sn_embedding(num_classes, num_features)
            self.bias = sn_embedding(num_classes, num_features)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn(x)
        if self.num_classes == 0:
            return h
        if y is None:
            raise ValueError("ConditionalBatchNorm2d: class labels y are required "
                             f"(num_classes={self.num_classes})")
        g = 1.0 + self.gain(y)
        b = self.bias(y)
        return h * g[:, :, None, None] + b[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN self-attention block (official `sn_non_local_block_sim` form by default).

    query/key: SN 1x1 conv C -> C/8; value: SN 1x1 conv C -> C/2; keys and values 2x2 max-pooled
    (N/4 key positions); softmax over keys with *no* 1/sqrt(d) scaling; output SN 1x1 conv back to
    C; `out = x + gamma * o` with gamma a scalar initialised to `gamma_init` (0: identity at init).

    pooled=False gives the paper / seed-code form: no pooling and C-wide values.
    heads>1 splits q/k/v channels into independent heads (q/k width must divide by heads).

    The attention is computed by `F.scaled_dot_product_attention(scale=1.0)`, so the N x M map is
    never materialised unless `return_attention=True`. q and k are zero-padded to the value width
    (`pad_qk`): q.k^T is unchanged, and SDPA can then pick its fused (flash / memory-efficient)
    kernels, which require equal head dims; without it CPU SDPA falls back to the math kernel.
    """

    def __init__(self, channels: int, heads: int = 1, pooled: bool = True,
                 gamma_init: float = 0.0, gamma_learnable: bool = True, pad_qk: bool = True):
        super().__init__()
        if channels % 8:
            raise ValueError(f"SelfAttention: channels must be a multiple of 8, got {channels}")
        qk = channels // 8
        v = channels // 2 if pooled else channels
        if qk % heads or v % heads:
            raise ValueError(f"SelfAttention: heads={heads} must divide q/k width {qk} and "
                             f"value width {v}")
        self.channels, self.heads, self.pooled, self.pad_qk = channels, heads, pooled, pad_qk
        self.qk_dim, self.v_dim = qk, v
        self.query = sn_conv2d(channels, qk, 1, bias=False)
        self.key = sn_conv2d(channels, qk, 1, bias=False)
        self.value = sn_conv2d(channels, v, 1, bias=False)
        self.out = sn_conv2d(v, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)),
                                  requires_grad=gamma_learnable)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C', H, W) -> (B, heads, H*W, C'/heads)."""
        b, c, h, w = t.shape
        return t.reshape(b, self.heads, c // self.heads, h * w).transpose(2, 3)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries (B,h,N,dq), keys (B,h,M,dq), values (B,h,M,dv)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.pooled:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        return self._heads(q), self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x)
        if return_attention:
            maps = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, heads, N, M)
            o = maps @ v
        else:
            maps = None
            dq, dv = q.shape[-1], v.shape[-1]
            if self.pad_qk and dq < dv:
                q = F.pad(q, (0, dv - dq))
                k = F.pad(k, (0, dv - dq))
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        o = o.transpose(2, 3).reshape(b, self.v_dim, h, w)
        out = x + self.gamma * self.out(o)
        return (out, maps) if return_attention else out
