"""SelfAttention and spectral norm: exact numerics against hand-computed references."""

import torch
import torch.nn.functional as F

from sagan.config import load_config
from sagan.layers import ConditionalBatchNorm2d, SelfAttention
from sagan.models import Discriminator, Generator


def _attn(channels=64, **kw) -> SelfAttention:
    torch.manual_seed(0)
    return SelfAttention(channels, **kw).eval()  # eval: SN weights fixed (no power iteration)


def test_gamma_zero_is_identity():
    a = _attn()
    x = torch.randn(2, 64, 16, 16)
    assert torch.equal(a(x), x)


def test_maps_equal_softmax_of_hand_computed_qk():
    a = _attn()
    with torch.no_grad():
        a.gamma.fill_(0.7)
        x = torch.randn(2, 64, 16, 16)
        out, maps = a(x, return_attention=True)
        q = F.conv2d(x, a.query.weight).flatten(2).transpose(1, 2)  # (B, N, C/8)
        k = F.max_pool2d(F.conv2d(x, a.key.weight), 2).flatten(2)  # (B, C/8, N/4)
        v = F.max_pool2d(F.conv2d(x, a.value.weight), 2).flatten(2)  # (B, C/2, N/4)
        ref = torch.softmax(q @ k, dim=-1)  # no 1/sqrt(d) scaling
        o = (v @ ref.transpose(1, 2)).view(2, 32, 16, 16)
        ref_out = x + 0.7 * F.conv2d(o, a.out.weight)
    assert maps.shape == (2, 1, 256, 64)
    torch.testing.assert_close(maps[:, 0], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 256), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_sdpa_path_matches_explicit_path():
    for kw in ({}, {"heads": 2}, {"pooled": False}, {"pad_qk": False}):
        a = _attn(**kw)
        with torch.no_grad():
            a.gamma.fill_(1.3)
            x = torch.randn(3, 64, 16, 16)
            fast = a(x)
            slow, _ = a(x, return_attention=True)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_variant_shapes():
    x = torch.randn(2, 64, 8, 8)
    a = _attn(heads=4)
    _, maps = a(x, return_attention=True)
    assert maps.shape == (2, 4, 64, 16) and a.value.weight.shape[0] == 32
    b = _attn(pooled=False)
    _, maps = b(x, return_attention=True)
    assert maps.shape == (2, 1, 64, 64) and b.value.weight.shape[0] == 64
    assert b(x).shape == x.shape


def test_gradient_flows_to_gamma_and_gamma_can_be_frozen():
    a = SelfAttention(64, gamma_init=0.0)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    a(x).square().sum().backward()
    assert a.gamma.grad is not None and a.gamma.grad.abs().item() > 0
    frozen = SelfAttention(64, gamma_init=0.5, gamma_learnable=False)
    assert not frozen.gamma.requires_grad and frozen.gamma.item() == 0.5


def test_spectral_norm_sigma_is_one_after_power_iterations():
    cfg = load_config(None, ["model.g_ch=16", "model.d_ch=16"])
    torch.manual_seed(0)
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    z, y = G.sample_inputs(4)
    for _ in range(10):  # training-mode forwards run one power iteration each
        D(G(z, y), y)
    G.eval(), D.eval()
    count = 0
    for net in (G, D):
        for m in net.modules():
            if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
                assert abs(sigma - 1.0) < 0.05, (type(m).__name__, sigma)
                count += 1
    # every conv/linear/embedding in G and D is spectrally normalised; BN is not
    plain = [m for net in (G, D) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.Embedding)
             and not torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    assert count > 30 and plain == []


def test_conditional_batchnorm_uses_labels():
    torch.manual_seed(0)
    bn = ConditionalBatchNorm2d(8, num_classes=3)
    x = torch.randn(6, 8, 4, 4)
    y0, y1 = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    assert not torch.allclose(bn(x, y0), bn(x, y1))
    plain = ConditionalBatchNorm2d(8, num_classes=0)
    assert plain(x).shape == x.shape
