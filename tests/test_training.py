"""Training step behaviour: D learns, G step leaves D alone, checkpoints resume bit-identically."""

import pytest
import torch

from sagan.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_generator,
    restore_trainer,
    save_checkpoint,
)
from sagan.config import load_config
from sagan.training import GANTrainer, NonFiniteLossError, to_floats
from tests.fixtures.tiny import TINY, repeat, tiny_batch


def test_d_steps_drive_hinge_loss_down():
    trainer = GANTrainer(load_config(None, TINY))
    x, y = tiny_batch()
    losses = [trainer.d_step(x, y)["loss_d"].item() for _ in range(50)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert last < 1.0  # below the 2.0 of an undecided D


def test_g_step_leaves_d_weights_unchanged():
    trainer = GANTrainer(load_config(None, TINY))
    x, y = tiny_batch()
    trainer.d_step(x, y)
    before = {k: v.clone() for k, v in trainer.D_raw.named_parameters()}
    g_before = {k: v.clone() for k, v in trainer.G_raw.named_parameters()}
    trainer.g_step(8)
    for k, v in trainer.D_raw.named_parameters():
        assert torch.equal(v, before[k]), k
        assert v.requires_grad == before[k].requires_grad
    changed = [k for k, v in trainer.G_raw.named_parameters() if not torch.equal(v, g_before[k])]
    assert len(changed) > 10  # G did learn


def test_g_step_gives_d_no_gradient():
    trainer = GANTrainer(load_config(None, TINY))
    trainer.opt_d.zero_grad(set_to_none=True)
    trainer.g_step(8)
    assert all(p.grad is None for p in trainer.D_raw.parameters())


def test_metrics_dict_has_losses_and_gammas():
    trainer = GANTrainer(load_config(None, TINY + ["model.g_attention=[8, 16]",
                                                   "model.d_attention=[16]", "train.ndis=2"]))
    m = to_floats(trainer.train_step(repeat(tiny_batch())))
    assert {"loss_d", "loss_g", "d_real", "d_fake", "gamma/g_attn8", "gamma/g_attn16",
            "gamma/d_attn16"} <= set(m)
    assert trainer.step == 1
    assert all(v == v for v in m.values())
    # gamma starts at 0 and moves once trained (it is learnable by default)
    for _ in range(3):
        m = to_floats(trainer.train_step(repeat(tiny_batch())))
    assert m["gamma/g_attn16"] != 0.0


def test_ema_tracks_then_averages():
    trainer = GANTrainer(load_config(None, TINY))
    data = repeat(tiny_batch())
    trainer.train_step(data)  # step 0 < ema_start: EMA == G
    for pe, p in zip(trainer.ema.module.parameters(), trainer.G_raw.parameters(), strict=True):
        assert torch.equal(pe, p)
    for _ in range(3):
        trainer.train_step(data)
    diffs = [(pe - p).abs().max().item()
             for pe, p in zip(trainer.ema.module.parameters(), trainer.G_raw.parameters(),
                              strict=True)]
    assert max(diffs) > 0  # averaging, not copying
    G = trainer.ema_generator()
    assert not G.training and G(*G.sample_inputs(2)).shape == (2, 1, 32, 32)


def test_checkpoint_roundtrip_resumes_bit_identically(tmp_path):
    cfg = load_config(None, TINY)
    a = GANTrainer(cfg)
    for i in range(3):
        a.train_step(repeat(tiny_batch(i)))
    path = save_checkpoint(tmp_path / "ckpt.pt", a)
    next_a = [to_floats(a.train_step(repeat(tiny_batch(9)))) for _ in range(2)]

    torch.manual_seed(1234)  # disturb global RNG: restore must not depend on it
    b = GANTrainer(cfg)
    restore_trainer(b, load_checkpoint(path))
    assert b.step == 3
    next_b = [to_floats(b.train_step(repeat(tiny_batch(9)))) for _ in range(2)]
    assert next_a == next_b
    for (k, va), vb in zip(a.G_raw.state_dict().items(), b.G_raw.state_dict().values(),
                           strict=True):
        assert torch.equal(va, vb), k
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_lr_decays_linearly_to_zero_and_resumes_from_a_checkpoint(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=8", "train.lr_decay=0.5", "train.lr_g=4e-4",
                                    "train.lr_d=8e-4"])
    a = GANTrainer(cfg)
    lrs = []
    for i in range(8):
        lrs.append((a.opt_g.param_groups[0]["lr"], a.opt_d.param_groups[0]["lr"]))
        a.train_step(repeat(tiny_batch(i)))
        if i == 5:
            path = save_checkpoint(tmp_path / "c.pt", a)
    # constant for the first half, then 4/4, 3/4, 2/4, 1/4 of the rate, and 0 at the end
    expect = [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [g for g, _ in lrs] == pytest.approx([4e-4 * k for k in expect])
    assert [d for _, d in lrs] == pytest.approx([8e-4 * k for k in expect])
    assert a.opt_g.param_groups[0]["lr"] == 0.0
    b = GANTrainer(cfg)
    restore_trainer(b, load_checkpoint(path))
    assert b.opt_g.param_groups[0]["lr"] == pytest.approx(4e-4 * 0.5)
    b.train_step(repeat(tiny_batch(6)))
    assert b.opt_d.param_groups[0]["lr"] == pytest.approx(8e-4 * 0.25)
    # a checkpoint written before the schedule existed resumes on it from its step
    old = load_checkpoint(path)
    del old["schedulers"]
    c = GANTrainer(cfg)
    restore_trainer(c, old)
    assert c.opt_g.param_groups[0]["lr"] == pytest.approx(4e-4 * 0.5)
    c.train_step(repeat(tiny_batch(6)))
    assert c.opt_d.param_groups[0]["lr"] == pytest.approx(8e-4 * 0.25)


def test_load_generator_from_checkpoint(tmp_path):
    a = GANTrainer(load_config(None, TINY))
    a.train_step(repeat(tiny_batch()))
    save_checkpoint(tmp_path / "c.pt", a)
    G, cfg = load_generator(tmp_path / "c.pt")
    assert cfg.model.num_classes == 3 and not G.training
    z, y = G.sample_inputs(4)
    assert G(z, y).shape == (4, 1, 32, 32)


def _bn_buffers(G):
    return {n: b.clone() for n, b in G.named_buffers() if "running_" in n}


def test_ema_generator_uses_standing_statistics_of_its_own_samples():
    trainer = GANTrainer(load_config(None, TINY + ["train.ema_standing_samples=64"]))
    data = repeat(tiny_batch())
    for _ in range(4):
        trainer.train_step(data)
    G = trainer.ema_generator()
    first = _bn_buffers(G)
    sn_before = {n: b.clone() for n, b in G.named_buffers() if n.endswith(("_u", "_v"))}
    # measured directly: the mean of the first BN's input over the same 64 seeded samples
    seen = []
    hook = G.blocks[0].bn1.bn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    G.standing_statistics(64, batch_size=100, seed=trainer.t.seed)
    hook.remove()
    assert not G.training
    mean = torch.cat(seen).mean(dim=(0, 2, 3))
    torch.testing.assert_close(G.blocks[0].bn1.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    raw = _bn_buffers(trainer.ema.module)  # the live EMA still carries G's running stats
    standing = _bn_buffers(G)
    assert any(not torch.allclose(raw[n], standing[n]) for n in raw)
    assert all(torch.equal(b, sn_before[n]) for n, b in G.named_buffers() if n in sn_before)
    # seeded: measuring again gives the same numbers, so every rank evaluates the same network
    assert all(torch.equal(first[n], standing[n]) for n in standing)
    assert trainer.ema_generator() is G  # built once per step
    trainer.train_step(data)
    assert trainer.ema_generator() is not G


def test_checkpointed_generator_samples_what_was_evaluated(tmp_path):
    trainer = GANTrainer(load_config(None, TINY + ["train.ema_standing_samples=64"]))
    for i in range(3):
        trainer.train_step(repeat(tiny_batch(i)))
    G_live = trainer.ema_generator()
    save_checkpoint(tmp_path / "c.pt", trainer)
    G_loaded, _ = load_generator(tmp_path / "c.pt")
    z, y = G_live.sample_inputs(6, torch.Generator().manual_seed(5))
    torch.testing.assert_close(G_loaded(z, y), G_live(z, y))
    # switched off: the EMA generator keeps the raw G's running statistics
    off = GANTrainer(load_config(None, TINY + ["train.ema_standing_samples=0"]))
    off.train_step(repeat(tiny_batch()))
    raw, G_off = _bn_buffers(off.G_raw), _bn_buffers(off.ema_generator())
    assert all(torch.equal(raw[n], G_off[n]) for n in raw)


def test_tampered_checkpoint_gives_clear_error(tmp_path):
    a = GANTrainer(load_config(None, TINY))
    path = save_checkpoint(tmp_path / "c.pt", a)
    state = torch.load(path, weights_only=True)
    key = next(iter(state["D"]))
    state["D"][key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    b = GANTrainer(load_config(None, TINY))
    with pytest.raises(CheckpointError, match="'D' weights do not match.*wrong shape"):
        restore_trainer(b, load_checkpoint(tmp_path / "bad.pt"))
    del state["opt_g"]
    torch.save(state, tmp_path / "bad2.pt")
    with pytest.raises(CheckpointError, match="missing keys: opt_g"):
        load_checkpoint(tmp_path / "bad2.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_skipped_step_leaves_bn_running_stats_finite():
    """nan_policy=skip: a step whose G activations overflow (lr_g=1e30 blows up G's BN gains
    after one update) is dropped, and G's BatchNorm running statistics (updated by the forward
    pass itself) are restored too, in G and in the EMA copy that sampling uses."""
    x, y = tiny_batch()
    tr = GANTrainer(load_config(None, TINY + ["train.nan_policy=skip", "train.lr_g=1e30"]))
    tr.train_step(repeat((x, y)))
    assert tr.skipped_steps == 0
    stats = {n: b.clone() for n, b in tr.G_raw.named_buffers() if ".running_" in n}
    assert stats
    for _ in range(2):
        tr.train_step(repeat((x, y)))
    assert tr.skipped_steps >= 2  # the divergence really happened
    for net in (tr.G_raw, tr.ema.module):
        bufs = dict(net.named_buffers())
        for n, v in stats.items():
            assert torch.equal(bufs[n], v), n  # exactly the last good step's statistics
    assert all(torch.isfinite(p).all() for p in tr.G_raw.parameters())


def test_nan_loss_stops_naming_the_step_or_is_skipped():
    x, y = tiny_batch()
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")
    trainer = GANTrainer(load_config(None, TINY))
    trainer.train_step(repeat((x, y)))
    before = {k: v.clone() for k, v in trainer.D_raw.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="loss_d at step 2"):
        trainer.train_step(repeat((x_bad, y)))
    for k, v in trainer.D_raw.named_parameters():
        assert torch.equal(v, before[k])  # the bad step touched nothing
    skipper = GANTrainer(load_config(None, TINY + ["train.nan_policy=skip"]))
    skipper.train_step(repeat((x_bad, y)))
    assert skipper.skipped_steps == 1 and skipper.step == 1


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("amp", ["auto", "bf16_native", "bf16", "none"])
def test_amp_modes_on_cpu_follow_the_hardware(amp):
    """bf16_native runs bf16 exactly where the CPU has it (cpuinfo, read independently of torch);
    the others do what they say regardless of the CPU. D's convolutions run in the mode's dtype,
    and the step trains."""
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    expected = {"auto": False, "bf16_native": native, "bf16": True, "none": False}[amp]
    trainer = GANTrainer(load_config(None, TINY + [f"train.amp={amp}"]))
    assert trainer.amp is expected
    x, y = tiny_batch()
    conv = next(m for m in trainer.D_raw.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    with trainer.autocast():
        trainer.D_raw(x, y)
    assert dtypes == [torch.bfloat16 if expected else torch.float32]
    m = to_floats(trainer.train_step(repeat((x, y))))
    assert all(v == v and abs(v) < 1e3 for v in m.values())
