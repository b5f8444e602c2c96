"""SAGAN building blocks: spectrally normalised layers, self-attention, conditional batch norm.

Spectral norm is torch's own parametrization (`nn.utils.parametrizations._SpectralNorm`, one power
iteration per training-mode forward), applied to every conv/linear/embedding in G and D as in the
official SAGAN code (G's first linear and last conv included; see README "Model"). It is used
through `FusedSpectralNorm`, a subclass with the same state and forward values but a fused
backward and fp32 sigma; convs are `SNConv2d`, which can run channels_last (`set_channels_last`).
Why and how much: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

SN_EPS = 1e-6


def _div_into(t: torch.Tensor, s: torch.Tensor,
              memory_format: torch.memory_format) -> torch.Tensor:
    """`t / s` written straight into `memory_format` (one pass, no layout copy afterwards).
    Under torch.compile the functional form is used: `out=` with a layout differing from the
    inputs' does not survive functionalization, and Inductor fuses the copy anyway."""
    if torch.compiler.is_compiling():
        return (t / s).contiguous(memory_format=memory_format)
    return torch.div(t, s, out=torch.empty_like(t, memory_format=memory_format))


class _DivideBySigma(torch.autograd.Function):
    """`weight / sigma` with `sigma = u . (W v)` (u, v constants), with a hand-fused backward.

    Why: autograd's backward through `weight / vdot(u, mv(W, v))` makes about ten full passes
    over every weight (DivBackward's grad/sigma, -grad*W/sigma^2, neg, sum, then MvBackward's
    outer product and the accumulation). Spectral norm runs on every conv/linear/embedding of G
    and D, so on CPU those passes cost ~10% of a SAGAN step. The closed form
    dW = G/sigma - (<G, W>/sigma^2) u v^T needs one scaled copy, one dot product and one
    in-place rank-1 update, and no host sync (every scalar stays a tensor).

    `memory_format` is the layout of the normalised weight handed to the conv (see
    `SNConv2d`); the parameter itself and its gradient stay contiguous.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                memory_format: torch.memory_format) -> torch.Tensor:
        sigma = torch.vdot(u, torch.mv(weight.flatten(1), v))  # same ops as torch's forward
        ctx.save_for_backward(weight, u, v, sigma)
        return _div_into(weight, sigma, memory_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, u, v, sigma = ctx.saved_tensors
        w = weight.contiguous()
        out = _div_into(grad, sigma, torch.contiguous_format)  # G / sigma, contiguous
        coef = torch.dot(out.reshape(-1), w.reshape(-1)) / sigma  # <G, W> / sigma^2
        out.reshape(out.shape[0], -1).addr_(u, v * coef, alpha=-1.0)  # in place, via a view
        return out, None, None, None


class FusedSpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrization (same buffers `_u`/`_v`, same power iteration, same
    state-dict keys, same forward values) with three performance changes:

    - the backward of `W / sigma` is the fused closed form of `_DivideBySigma`;
    - sigma and the power iteration always run in fp32, autocast disabled: under bf16 autocast
      torch's version would run `mv` in bf16 (~3 significant digits), a noisy sigma that then
      scales every weight of the network;
    - conv weights can be emitted channels_last (`memory_format`) while the parameter stays
      contiguous, so convs run channels_last without the optimizer, EMA and the power
      iteration paying a layout copy of every weight on every step.
    """

    memory_format: torch.memory_format = torch.contiguous_format

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1 or self.dim != 0:
            return super().forward(weight)
        fmt = self.memory_format if weight.ndim == 4 else torch.contiguous_format
        with torch.autocast(device_type=weight.device.type, enabled=False):
            weight_mat = weight.flatten(1)
            if self.training:
                self._power_method(weight_mat, self.n_power_iterations)
            # clone: a later forward's in-place power iteration must not change saved u, v
            u = self._u.clone(memory_format=torch.contiguous_format)
            v = self._v.clone(memory_format=torch.contiguous_format)
            if torch.is_grad_enabled() and weight.requires_grad:
                return _DivideBySigma.apply(weight, u, v, fmt)
            return _div_into(weight, torch.vdot(u, torch.mv(weight_mat, v)), fmt)


# On CPU, feature maps of at most this many positions (4x4) run NCHW even with channels_last on:
# there oneDNN's NCHW kernels are ~1.6x faster than its channels_last ones for the 512/1024-channel
# 3x3 convs of D's last block; from 8x8 up channels_last wins (docs/PERFORMANCE.md). Not applied
# on GPU, where this was not measured and cuDNN's bf16 kernels prefer channels_last throughout.
SMALL_MAP_POSITIONS = 16


def _box2x2(w: torch.Tensor) -> torch.Tensor:
    """(O, I, k, k) -> (O, I, k+1, k+1): each output tap is the sum of the 2x2 input taps that
    overlap it, i.e. the kernel convolved with a 2x2 box (separable: two shifted adds)."""
    w = F.pad(w, (0, 1)) + F.pad(w, (1, 0))
    return F.pad(w, (0, 0, 0, 1)) + F.pad(w, (0, 0, 1, 0))


class SNConv2d(nn.Conv2d):
    """Conv2d with two performance options, neither of which changes what it computes.

    `channels_last`: run in the memory format fastest for the size of the map it is given:
    channels_last, except NCHW for CPU maps of at most `SMALL_MAP_POSITIONS` positions. It sets
    the layout of both operands (input, and the normalised weight that its `FusedSpectralNorm`
    emits), because a conv runs channels_last when *either* is. Off, it is a plain Conv2d.

    `fuse_resampling` (used by `forward_pooled` / `forward_upsampled`, the resampling convs of
    the ResNet blocks): a 3x3 conv followed by 2x2 average pooling is *one* 4x4 stride-2 conv, and
    2x nearest upsampling followed by a 3x3 conv is *one* 4x4 stride-2 transposed conv, each with
    a kernel that is the 3x3 kernel convolved with a 2x2 box; a 1x1 conv commutes with both
    resamplings, so it runs on the low-resolution side. Same function (exact in real arithmetic,
    float rounding aside), 2.25x fewer FLOPs for the 3x3 convs and 4x fewer for the 1x1 skips,
    and no pooling/upsampling pass. Below `SMALL_MAP_POSITIONS` on the low-resolution side the
    plain form is kept: there the stride-2 kernels were slower on CPU (docs/PERFORMANCE.md).
    """

    channels_last: bool = False
    fuse_resampling: bool = True

    def _layout(self, x: torch.Tensor, positions: int,
                weight_direct: bool = True) -> torch.memory_format:
        """The memory format for a conv on a map of `positions`. The normalised weight is
        emitted in it when the conv uses it directly (`weight_direct`), contiguous otherwise
        (a derived kernel is converted once, after it is built)."""
        if not self.channels_last:
            return torch.contiguous_format
        small = x.device.type == "cpu" and positions <= SMALL_MAP_POSITIONS
        fmt = torch.contiguous_format if small else torch.channels_last
        if parametrize.is_parametrized(self, "weight"):
            for p in self.parametrizations.weight:
                if isinstance(p, FusedSpectralNorm):
                    p.memory_format = fmt if weight_direct else torch.contiguous_format
        return fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=self._layout(x, x.shape[-2] * x.shape[-1]))
        return super().forward(x)

    def _fusable(self, low_res_positions: int) -> bool:
        return (self.fuse_resampling and self.kernel_size == (3, 3) and self.padding == (1, 1)
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and low_res_positions > SMALL_MAP_POSITIONS)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """`avg_pool2d(self(x), 2)`; with `fuse_resampling`, one 4x4 stride-2 conv (3x3) or
        pool-then-conv (1x1)."""
        h, w = x.shape[-2:]
        if self.fuse_resampling and self.kernel_size == (1, 1):
            return self(F.avg_pool2d(x, 2))
        if not self._fusable((h // 2) * (w // 2)):
            return F.avg_pool2d(self(x), 2)
        fmt = self._layout(x, h * w, weight_direct=False)
        # out[p] = 1/4 sum_{i,j in {0,1}} conv3x3(x)[2p + (i,j)]  =  conv4x4(x, box(K)/4)[p]
        kernel = (_box2x2(self.weight) * 0.25).contiguous(memory_format=fmt)
        return F.conv2d(x.contiguous(memory_format=fmt), kernel, self.bias, stride=2, padding=1)

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """`self(interpolate(x, scale_factor=2, mode="nearest"))`; with `fuse_resampling`, one
        4x4 stride-2 transposed conv (3x3) or conv-then-upsample (1x1)."""
        h, w = x.shape[-2:]
        if self.fuse_resampling and self.kernel_size == (1, 1):
            return F.interpolate(self(x), scale_factor=2, mode="nearest")
        if not self._fusable(h * w):
            return self(F.interpolate(x, scale_factor=2, mode="nearest"))
        fmt = self._layout(x, 4 * h * w, weight_direct=False)
        # output row r = 2p + t - 1 sees input rows p (and p - 1): the flipped 3x3 kernel summed
        # over 2x2 boxes, transposed to conv_transpose2d's (in, out, kh, kw)
        kernel = _box2x2(self.weight.flip(2, 3)).transpose(0, 1).contiguous(memory_format=fmt)
        return F.conv_transpose2d(x.contiguous(memory_format=fmt), kernel, self.bias,
                                  stride=2, padding=1)


def set_channels_last(module: nn.Module, enabled: bool = True) -> None:
    """Run every `SNConv2d` of `module` channels_last (except on tiny maps, see `SNConv2d`).

    Only the *normalised* weights and the activations change layout; parameters, gradients and
    optimizer state stay contiguous, so neither the power iteration, nor Adam, nor the EMA pays
    a layout copy of every weight on every step (they would if the parameters were converted
    with `module.to(memory_format=torch.channels_last)`)."""
    for m in module.modules():
        if isinstance(m, SNConv2d):
            m.channels_last = enabled
        elif isinstance(m, FusedSpectralNorm) and not enabled:
            m.memory_format = torch.contiguous_format


def set_fused_resampling(module: nn.Module, enabled: bool = True) -> None:
    """Switch `SNConv2d.fuse_resampling` for every conv of `module` (on by default)."""
    for m in module.modules():
        if isinstance(m, SNConv2d):
            m.fuse_resampling = enabled


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = SN_EPS) -> nn.Module:
    """Register `FusedSpectralNorm` on `module.<name>` (drop-in for torch's `spectral_norm`:
    same init, same RNG draws, same state-dict keys, so checkpoints load either way)."""
    weight = getattr(module, name)
    parametrize.register_parametrization(
        module, name, FusedSpectralNorm(weight, n_power_iterations, 0, eps))
    return module


def sn_conv2d(in_ch: int, out_ch: int, kernel_size: int = 3, padding: int | None = None,
              bias: bool = True) -> SNConv2d:
    """Spectrally normalised Conv2d ('same' padding by default)."""
    pad = kernel_size // 2 if padding is None else padding
    conv = SNConv2d(in_ch, out_ch, kernel_size, padding=pad, bias=bias)
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

    form="sn" (BigGAN-PyTorch): gain = 1 + SN-embedding(y), bias = SN-embedding(y); the `1 +`
    keeps the layer an ordinary BN at init however the (unit-spectral-norm) embeddings start.
    form="plain" (the official SAGAN code): per-class gain and bias tables initialised to 1 and 0,
    no SN; Adam moves each entry by ~lr per step, so classes separate within a few hundred steps.
    With num_classes == 0 it is a plain affine BatchNorm2d, so G needs a single code path.
    """

    def __init__(self, num_features: int, num_classes: int, momentum: float = 0.1,
                 form: str = "sn"):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(num_features, affine=num_classes == 0, momentum=momentum)
        self.gain_offset = 1.0 if form == "sn" else 0.0
        if num_classes > 0 and form == "sn":
            self.gain = sn_embedding(num_classes, num_features)
            self.bias = sn_embedding(num_classes, num_features)
        elif num_classes > 0:
            self.gain = nn.Embedding(num_classes, num_features)
            self.bias = nn.Embedding(num_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn(x)
        if self.num_classes == 0:
            return h
        if y is None:
            raise ValueError("ConditionalBatchNorm2d: class labels y are required "
                             f"(num_classes={self.num_classes})")
        g = self.gain(y) + self.gain_offset
        b = self.bias(y)
        # one fused pass (b + h * g) instead of a multiply and an add over the feature map
        return torch.addcmul(b[:, :, None, None], h, g[:, :, None, None])


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
    The fused kernels also need unit stride in the head dim, which `_heads` guarantees.
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
        """(B, C', H, W) -> (B, heads, H*W, C'/heads) with unit stride in the last dim.

        flatten(2).transpose(1, 2) is the (B, N, C') token matrix; for a channels_last map it is
        already contiguous (no copy), for an NCHW map one small copy makes it so."""
        b, c = t.shape[:2]
        tokens = t.flatten(2).transpose(1, 2)  # (B, N, C')
        if tokens.stride(-1) != 1:
            # NCHW input: SDPA's fused kernels need unit stride in the head dim, else it silently
            # takes the math kernel and materialises the N x M map after all
            tokens = tokens.contiguous()
        return tokens.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

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
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # (B, heads, N, dv) -> (B, H, W, C') viewed as channels_last NCHW: no copy when SDPA
            # wrote its output token-major, and the 1x1 conv below stays channels_last
            o = o.transpose(1, 2).reshape(b, h, w, self.v_dim).permute(0, 3, 1, 2)
        else:
            o = o.transpose(2, 3).reshape(b, self.v_dim, h, w)
        out = torch.addcmul(x, self.gamma, self.out(o))  # x + gamma * o in one pass
        return (out, maps) if return_attention else out
