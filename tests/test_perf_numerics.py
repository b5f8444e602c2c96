"""The performance code paths compute what the plain ones do (issue 8): fused spectral-norm
backward, channels_last, fused resampling convs, layout-preserving attention, the sync-free EMA
and NaN checks, torch.compile (or its failure), and the prefetcher. No timing assertions here
(bench/ measures speed)."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import sagan.training as training
from infra.local.s3 import free_port
from sagan.config import load_config
from sagan.layers import (
    SN_EPS,
    SelfAttention,
    set_channels_last,
    set_fused_resampling,
    sn_conv2d,
    spectral_norm,
)
from sagan.models import Discriminator, Generator
from sagan.prefetch import Prefetcher
from sagan.training import GANTrainer, to_floats
from tests.fixtures.tiny import TINY, repeat, tiny_batch


def _sequence(n):
    return iter([tiny_batch(i) for i in range(n)])


# --------------------------------------------------------------------------- spectral norm

@pytest.mark.parametrize("make, shape", [
    (lambda: torch.nn.Conv2d(16, 32, 3), (4, 16, 9, 9)),
    (lambda: torch.nn.Linear(20, 24), (5, 20)),
    (lambda: torch.nn.Embedding(7, 12), None),
])
def test_fused_spectral_norm_matches_torch(make, shape):
    torch.manual_seed(0)
    ref = torch_spectral_norm(make(), eps=SN_EPS)
    torch.manual_seed(0)
    ours = spectral_norm(make())
    assert ref.state_dict().keys() == ours.state_dict().keys()  # checkpoints load either way
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k  # same init and RNG draws
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # training forwards: power iteration, then W / sigma
        x = (torch.randint(0, 7, (6,), generator=g) if shape is None
             else torch.randn(*shape, generator=g))
        out_ref, out = ref(x), ours(x)
        assert torch.equal(out_ref, out)
        gy = torch.randn(out.shape, generator=g)
        out_ref.backward(gy)
        out.backward(gy)
        g_ref = ref.parametrizations.weight.original.grad
        g_ours = ours.parametrizations.weight.original.grad
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max())
        ref.zero_grad()
        ours.zero_grad()
    assert torch.equal(ref.parametrizations.weight[0]._u, ours.parametrizations.weight[0]._u)


def test_sn_conv_layout_follows_map_size_and_sigma_stays_fp32():
    torch.manual_seed(0)
    conv = sn_conv2d(8, 16, 3).eval()
    x8, x4 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)
    want8, want4, w = conv(x8), conv(x4), conv.weight
    set_channels_last(conv, True)
    got8, got4 = conv(x8), conv(x4)
    assert got8.is_contiguous(memory_format=torch.channels_last) and not got8.is_contiguous()
    assert got4.is_contiguous()  # 4x4 maps run NCHW: faster there (SMALL_MAP_POSITIONS)
    torch.testing.assert_close(got8, want8, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got4, want4, rtol=1e-5, atol=1e-5)
    assert conv.parametrizations.weight.original.is_contiguous()  # the parameter is untouched
    set_channels_last(conv, False)
    assert conv(x8).is_contiguous() and conv.weight.is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_amp = conv.weight  # sigma computed in fp32 even under bf16 autocast
    assert w_amp.dtype == torch.float32 and torch.equal(w_amp, w)


# --------------------------------------------------------------------------- fused resampling

def _resample_run(conv, x, mode, fused):
    set_fused_resampling(conv, fused)
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as flops:
        out = conv.forward_pooled(x) if mode == "pool" else conv.forward_upsampled(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out, x.grad, conv.parametrizations.weight.original.grad, flops.get_total_flops()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode, k, size, flop_ratio", [
    ("pool", 3, 16, 16 / 36),     # conv3x3 + avgpool -> one 4x4 stride-2 conv
    ("up", 3, 8, 16 / 36),        # upsample + conv3x3 -> one 4x4 stride-2 transposed conv
    ("pool", 1, 16, 1 / 4),       # 1x1 conv runs after the pooling
    ("up", 1, 8, 1 / 4),          # 1x1 conv runs before the upsampling
    ("pool", 3, 8, 1.0),          # low-resolution side 4x4: plain form kept
    ("up", 3, 4, 1.0),
])
def test_fused_resampling_is_the_same_function(mode, k, size, flop_ratio, channels_last):
    """Same outputs and gradients (input and weight) as resample-then-conv / conv-then-pool, in
    float64, with 2.25x (3x3) or 4x (1x1) fewer FLOPs where fused."""
    torch.manual_seed(0)
    conv = sn_conv2d(6, 10, k).double().train()
    set_channels_last(conv, channels_last)
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    sn = conv.parametrizations.weight[0]
    u0, v0 = sn._u.clone(), sn._v.clone()
    plain = _resample_run(conv, x, mode, fused=False)
    sn._u.copy_(u0)  # the same power-iteration start for both
    sn._v.copy_(v0)
    fused = _resample_run(conv, x, mode, fused=True)
    for a, b in zip(fused[:3], plain[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fused[3] == pytest.approx(plain[3] * flop_ratio, rel=0.02)


def test_fused_resampling_models_match_the_plain_form():
    """G and D at 64 px: same logits and gradients with train.fuse_resampling on and off."""
    cfg = load_config(None, TINY + ["model.image_size=64"]).model
    nets = {}
    for fused in (False, True):
        torch.manual_seed(0)
        G, D = Generator(cfg).double(), Discriminator(cfg).double()
        set_fused_resampling(G, fused)
        set_fused_resampling(D, fused)
        gen = torch.Generator().manual_seed(1)
        z = torch.randn(4, cfg.z_dim, dtype=torch.float64, generator=gen)
        y = torch.tensor([0, 1, 2, 0])
        out = D(G(z, y), y)
        out.sum().backward()
        nets[fused] = (out, [p.grad for p in [*G.parameters(), *D.parameters()]])
    torch.testing.assert_close(nets[True][0], nets[False][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(nets[True][1], nets[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_trainer_applies_fuse_resampling_flag():
    for flag in (False, True):
        tr = GANTrainer(load_config(None, TINY + [f"train.fuse_resampling={str(flag).lower()}"]))
        convs = [m for net in (tr.G_raw, tr.D_raw, tr.ema.module) for m in net.modules()
                 if hasattr(m, "fuse_resampling")]
        assert convs and all(m.fuse_resampling is flag for m in convs)


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("kw", [{}, {"heads": 2}, {"pooled": False}])
def test_attention_channels_last_matches_contiguous(kw):
    torch.manual_seed(0)
    a = SelfAttention(64, **kw)
    with torch.no_grad():
        a.gamma.fill_(0.9)
    x = torch.randn(2, 64, 16, 16)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    a.eval()
    out1, out2 = a(x1), a(x2)
    assert out2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(out1)
    out1.backward(gy)
    out2.backward(gy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- trainer

def _flat_grad(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def test_channels_last_training_matches_contiguous():
    """Same losses and gradients, step after step.

    Tiny learning rates: Adam's first updates are ~lr * sign(grad), so rounding-level
    differences in near-zero gradients would move weights by a full lr and make *any* two
    implementations drift apart visibly. G's gradient is compared as a whole (relative L2):
    every G layer feeds a BatchNorm, whose backward cancels large terms, so for some noise draws
    even contiguous fp32 is ~1e-3 off a float64 reference in individual entries."""
    runs = {}
    for cl in (False, True):
        tr = GANTrainer(load_config(None, TINY + ["train.lr_d=1e-9", "train.lr_g=1e-9",
                                                  f"train.channels_last={str(cl).lower()}"]))
        data = repeat(tiny_batch())
        runs[cl] = ([to_floats(tr.train_step(data)) for _ in range(3)], tr)
    for m0, m1 in zip(runs[False][0], runs[True][0], strict=True):
        for k in m0:
            assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    for net, tol in (("D_raw", 1e-4), ("G_raw", 1e-2)):
        g0, g1 = (_flat_grad(getattr(runs[cl][1], net)) for cl in (False, True))
        assert float((g1 - g0).norm() / g0.norm()) < tol, net


def test_ema_is_bit_identical_to_averaged_model():
    """The sync-free EMA update does exactly what AveragedModel.update_parameters did."""
    tr = GANTrainer(load_config(None, TINY))
    ref = AveragedModel(tr.G_raw, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    data = repeat(tiny_batch())
    for step in range(5):
        tr.train_step(data)
        if step < tr.t.ema_start:
            ref.n_averaged.zero_()
        ref.update_parameters(tr.G_raw)
        for (k, a), b in zip(ref.state_dict().items(), tr.ema.state_dict().values(),
                             strict=True):
            assert torch.equal(a, b), (step, k)


class _LocalScalarCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_train_step_reads_back_from_the_device_once(monkeypatch):
    tr = GANTrainer(load_config(None, TINY + ["train.ndis=2"]))
    assert tr._deferred_check  # fused Adam on CPU
    tolist_calls = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: tolist_calls.append(1) or real_tolist(self))
    with _LocalScalarCounter() as counter:
        tr.train_step(repeat(tiny_batch()))
    assert counter.count == 0  # no .item() / bool(tensor) / float(tensor) inside the step
    assert len(tolist_calls) == 1  # the three finiteness flags, read together


def test_skipped_update_leaves_adam_state_untouched():
    tr = GANTrainer(load_config(None, TINY + ["train.nan_policy=skip"]))
    x, y = tiny_batch()
    tr.train_step(repeat((x, y)))
    state = {k: v.clone() for k, v in tr.opt_d.state[tr.opt_d.param_groups[0]["params"][0]].items()}
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("inf")
    m = tr.d_step(x_bad, y)  # standalone call: resolved at once
    assert tr.skipped_steps == 1 and not torch.isfinite(m["loss_d"])
    after = tr.opt_d.state[tr.opt_d.param_groups[0]["params"][0]]
    for k, v in state.items():
        assert torch.equal(after[k], v), k  # step count rolled back, moments unchanged


# --------------------------------------------------------------------------- compile

def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler on this machine (test)")


def _failing_backward_backend():
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, example_inputs):
        return gm.forward

    def bw(gm, example_inputs):
        raise RuntimeError("backward compile failed (test)")

    return aot_autograd(fw_compiler=fw, bw_compiler=bw)


@pytest.mark.parametrize("backend", ["forward", "backward"])
def test_compile_failure_fails_loudly_without_fallback(monkeypatch, backend):
    """train.compile=true compiles or fails: a compile error at the first forward or the first
    backward stops the step with torch's error; nothing silently falls back to eager mode."""
    torch._dynamo.reset()
    monkeypatch.setattr(training, "COMPILE_OPTIONS", {
        "backend": _failing_backend if backend == "forward" else _failing_backward_backend()})
    compiled = GANTrainer(load_config(None, TINY + ["train.compile=true"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="no compiler on this machine|backward compile "
                                               "failed"):
            compiled.train_step(_sequence(2))
    assert compiled.step == 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_matches_eager(monkeypatch):
    """A working compile (Dynamo + AOTAutograd tracing of forward and backward, the custom
    spectral-norm Function and the channels_last layout switches included; eager kernels, so no
    C++ toolchain needed) computes the same step as eager mode, without warnings."""
    torch._dynamo.reset()
    monkeypatch.setattr(training, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    eager = GANTrainer(load_config(None, TINY + ["train.channels_last=true"]))
    compiled = GANTrainer(load_config(None, TINY + ["train.channels_last=true",
                                                    "train.compile=true"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = [to_floats(compiled.train_step(repeat(tiny_batch()))) for _ in range(2)]
    want = [to_floats(eager.train_step(repeat(tiny_batch()))) for _ in range(2)]
    for m0, m1 in zip(want, got, strict=True):
        for k in m0:
            assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-5), k
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
               for m in (compiled.G, compiled.D))
    torch._dynamo.reset()


# --------------------------------------------------------------------------- prefetcher

def test_prefetcher_preserves_order_layout_and_errors():
    src = [(torch.full((2, 3, 4, 4), float(i)), torch.tensor([i, i])) for i in range(5)]
    with Prefetcher(src, "cpu", depth=2, memory_format=torch.channels_last) as pf:
        got = list(pf)
    assert [int(y[0]) for _, y in got] == list(range(5))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in got)
    assert all(torch.equal(x, s[0]) for (x, _), s in zip(got, src, strict=True))

    def broken():
        yield torch.zeros(1)
        raise ValueError("bad shard")

    pf = Prefetcher(broken(), "cpu")
    assert torch.equal(next(pf), torch.zeros(1))
    with pytest.raises(ValueError, match="bad shard"):
        next(pf)
    with pytest.raises(StopIteration):
        next(pf)

    endless = Prefetcher(repeat(torch.ones(1)), "cpu", depth=3)
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()


# --------------------------------------------------------------------------- DDP

def _nan_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(None, TINY + ["train.batch_size=8", "train.workers=2",
                                    "train.nan_policy=skip"])
    trainer = GANTrainer(cfg, rank=rank)
    x, y = tiny_batch(10 + rank, n=4)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for step in range(3):  # only rank 1's step-2 batch is bad: both ranks must skip together
        trainer.train_step(repeat((bad if (rank == 1 and step == 1) else x, y)))
    torch.save({"G": trainer.G_raw.state_dict(), "D": trainer.D_raw.state_dict(),
                "skipped": trainer.skipped_steps}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_on_skipping_a_non_finite_step(tmp_path):
    mp.start_processes(_nan_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["skipped"] == r1["skipped"] == 1
    for net in ("G", "D"):
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs across ranks"
            assert torch.isfinite(r0[net][k]).all(), f"{net}.{k} is not finite"
