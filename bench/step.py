"""Full SAGAN training step (D step + G step, optimizers, EMA): ours vs a plain baseline.

    python -m bench.step                      # 64-px preset, its per-device batch (128/4 = 32)
    python -m bench.step --reps 10 --also nchw unfused --profile 15   # + ablations
    python -m bench.step --batch 16 --out bench/results/step_batch16.json
    python -m bench.step --preset 128 --device cuda --steps-per-rep 5   # GPU

The default batch is the preset's *per-device* batch, `train.batch_size / cluster.workers` (32 for
the 64 and 128 px presets): what each device of the preset's DDP job steps on.

Both sides build the same architecture from the preset YAML (configs/sagan<N>.yaml; the 64-px
preset has attention at feat32 in G and D) with the same seed, hence the same initial weights,
and train on the same fixed synthetic batch, interleaved rep by rep in one process.

* ours: `sagan.training.GANTrainer` as configured — fused-backward spectral norm, SDPA attention
  with padded q/k, fused Adam, foreach EMA, one host sync per step, conv+pool and upsample+conv
  each as one stride-2 conv (`train.fuse_resampling`), channels_last when `--channels-last on`
  (the default), bf16 autocast on GPU (`train.amp=auto`; `--set train.amp=bf16` for bf16 on
  CPU), `torch.compile` with `--compile` (or as an extra side with `--also compiled`).
* baseline (written here, `PlainStep`): explicit bmm attention with the softmax map
  materialised, torch's stock spectral norm, unfused conditional BN, upsampling and pooling as
  separate passes around full-resolution convs, default memory format, fp32, plain (non-fused,
  non-foreach) Adam, a per-parameter EMA loop, and a host sync (`.item()`) after each of the D
  and G losses.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one step of each side.
MFU credits every side with the *model* FLOPs, the baseline's count (the standard formulation of
the architecture: what "the model needs", as in PaLM's definition of MFU); HFU uses the FLOPs
the side actually executes (ours: ~26% fewer at 64 px, from the fused resampling; slightly more
from the zero-padded q/k). The device's matmul peak is measured in the same run
(bench/timing.py `PeakTracker`: fp32 on CPU as the best of MKL and oneDNN GEMMs, bf16 on GPU; at
the start, between timing rounds and at the end, the best seen is used).
MFU = model FLOPs per second / that peak; HFU = executed FLOPs per second / that peak.
Reported per side: img/s, MFU and HFU at the median and the best rep; speed-ups vs the baseline
as the median of per-round paired ratios (the headline), the ratio of medians, of bests, and of
images per process-CPU-second (least sensitive to other jobs on the machine). The MFU target is
checked on the best rep: the peak is a best-of measurement too, and on a shared machine a median
step measures other jobs' load as much as the step (docs/PERFORMANCE.md).
Targets (issue 8, CPU, 64-px preset, attention at 32): ours img/s >= 1.25x the baseline's in the
same run, and MFU >= 0.75. The step uses `train.ema_start=0` (steady-state EMA averaging).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import types
from pathlib import Path
from typing import Any

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import (
    RESULTS, PeakTracker, environment, interleave, paired_ratio, write_json,
)

import torch
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.utils.flop_counter import FlopCounterMode

from pipelines.config import load_run_config
from sagan.config import Config, load_config
from sagan.layers import (
    ConditionalBatchNorm2d, FusedSpectralNorm, SelfAttention, set_fused_resampling,
)
from sagan.losses import get_losses
from sagan.models import Discriminator, Generator
from sagan.training import GANTrainer
# isort: on

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", type=int, nargs="+", default=[64], choices=[32, 64, 128],
                    help="configs/sagan<N>.yaml presets to run")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size per step (default: the preset's per-device batch, "
                         "train.batch_size / cluster.workers)")
    ap.add_argument("--reps", type=int, default=8, help="timed reps per side (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed reps per side first")
    ap.add_argument("--steps-per-rep", type=int, default=1,
                    help="train steps per timed rep (GPU: >1 lets queued work overlap)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", choices=["on", "off"], default="on",
                    help="ours' train.channels_last (on: measured to help on CPU, and the usual "
                         "choice for bf16 convs on GPU)")
    ap.add_argument("--compile", action="store_true", help="ours with train.compile=true")
    ap.add_argument("--also", nargs="*", default=[], choices=["nchw", "compiled", "unfused"],
                    help="extra sides in the same interleaved run: ours with "
                         "train.channels_last=false (nchw), with train.compile=true "
                         "(compiled), with train.fuse_resampling=false (unfused)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for both sides, e.g. model.g_attention=[16]")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one step of every side and print its N most "
                         "expensive ops (self CPU time; also saved in the JSON)")
    ap.add_argument("--out", default=str(RESULTS / "step.json"))
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- plain baseline


def plain_attention_forward(self: SelfAttention, x: torch.Tensor,
                            return_attention: bool = False):
    """Explicit attention: materialise softmax(q kᵀ) (B*heads, N, M), then bmm with v."""
    b, c, h, w = x.shape
    q, k, v = self.qkv(x)
    heads, n, m = q.shape[1], q.shape[2], k.shape[2]
    q, k, v = q.reshape(b * heads, n, -1), k.reshape(b * heads, m, -1), v.reshape(b * heads, m, -1)
    maps = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    o = torch.bmm(maps, v).view(b, heads, n, -1).transpose(2, 3).reshape(b, self.v_dim, h, w)
    out = x + self.gamma * self.out(o)
    return (out, maps.view(b, heads, n, m)) if return_attention else out


def plain_cbn_forward(self: ConditionalBatchNorm2d, x: torch.Tensor,
                      y: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional BN as a multiply and an add."""
    h = self.bn(x)
    if self.num_classes == 0:
        return h
    g = 1.0 + self.gain(y)
    b = self.bias(y)
    return h * g[:, :, None, None] + b[:, :, None, None]


def make_plain(net: torch.nn.Module) -> torch.nn.Module:
    """Swap our fused pieces for the plain ones, in place, keeping every weight and buffer:
    torch's stock spectral norm (same state, autograd through W / sigma), explicit attention,
    mul+add conditional BN, resampling as a separate pass (upsample, then conv; conv, then
    pool)."""
    set_fused_resampling(net, False)
    for m in net.modules():
        if isinstance(m, FusedSpectralNorm):
            m.__class__ = _SpectralNorm
        elif isinstance(m, SelfAttention):
            m.forward = types.MethodType(plain_attention_forward, m)
        elif isinstance(m, ConditionalBatchNorm2d):
            m.forward = types.MethodType(plain_cbn_forward, m)
    return net


class PlainStep:
    """The baseline training step, written the straightforward way (same semantics as
    GANTrainer: one D forward over cat(real, fake), G step through a frozen D, EMA of G with
    buffers copied, the same noise stream)."""

    def __init__(self, cfg: Config, device: torch.device):
        t = cfg.train
        self.device, self.t = device, t
        torch.manual_seed(t.seed)  # same init as GANTrainer
        self.G = make_plain(Generator(cfg.model).to(device))
        self.D = make_plain(Discriminator(cfg.model).to(device))
        self.ema = copy.deepcopy(self.G).requires_grad_(False)
        betas = (t.beta1, t.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=betas,
                                      foreach=False, fused=False)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=betas,
                                      foreach=False, fused=False)
        self.d_loss, self.g_loss = get_losses(t.loss)
        self.noise = torch.Generator(device=device)
        self.noise.manual_seed(t.seed * 1_000_003 + 7919)  # GANTrainer's rank-0 noise seed
        self.step = 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        b = x.shape[0]
        z, yf = self.G.sample_inputs(b, generator=self.noise, device=self.device)
        with torch.no_grad():
            fake = self.G(z, yf)
        logits = self.D(torch.cat([x, fake]), torch.cat([y, yf]) if y is not None else None)
        loss_d = self.d_loss(logits[:b], logits[b:])
        if not math.isfinite(loss_d.item()):
            raise FloatingPointError("baseline: non-finite loss_d")
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        self.D.requires_grad_(False)
        z, yf = self.G.sample_inputs(b, generator=self.noise, device=self.device)
        loss_g = self.g_loss(self.D(self.G(z, yf), yf))
        if not math.isfinite(loss_g.item()):
            raise FloatingPointError("baseline: non-finite loss_g")
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.D.requires_grad_(True)

        with torch.no_grad():
            copy_ = self.step < self.t.ema_start or self.step == 0
            for pe, p in zip(self.ema.parameters(), self.G.parameters(), strict=True):
                if copy_:
                    pe.copy_(p)
                else:
                    pe.mul_(self.t.ema_decay).add_(p, alpha=1.0 - self.t.ema_decay)
            for be, bg in zip(self.ema.buffers(), self.G.buffers(), strict=True):
                be.copy_(bg)
        self.step += 1
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}


# --------------------------------------------------------------------------- measurement


def count_flops(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def profile_ops(fn, top: int) -> dict[str, Any]:
    """Self CPU time per op for one call of `fn` (torch.profiler), the `top` largest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"total_ms": total / 1e3,
            "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
                    for e in ops[:top]]}


def _side_stats(s: Any, imgs: int, flops: float, executed_flops: float) -> dict[str, Any]:
    """img/s and model FLOP/s (model FLOPs: the baseline's count, credited to every side) at
    the median and the best rep; `executed_flops` (what this side really runs) is kept for HFU.
    MFU/HFU need the run's final peak: `_add_utilisation`."""
    summ = s.summary()
    med, best = summ["wall_median_s"], summ["wall_min_s"]
    return {**summ,
            "img_per_s_median": imgs / med, "img_per_s_best": imgs / best,
            "flops_per_s_median": flops / med, "flops_per_s_best": flops / best,
            "executed_flops": executed_flops, "img_per_cpu_s": imgs / summ["cpu_median_s"]}


def _add_utilisation(result: dict[str, Any], peak: float) -> None:
    """MFU (model FLOP/s / peak) and HFU (executed FLOP/s / peak) of every side, and the MFU
    target. The target is checked on the best rep: the peak is the best seen in the whole run,
    and a median step against a best-of peak would charge other jobs' load to the step."""
    for s in result["sides"].values():
        s["mfu_median"] = s["flops_per_s_median"] / peak
        s["mfu_best"] = s["flops_per_s_best"] / peak
        s["hfu_median"] = s["executed_flops"] / s["wall_median_s"] / peak
        s["hfu_best"] = s["executed_flops"] / s["wall_min_s"] / peak
    result["targets"]["mfu_ge_0.75"] = result["sides"]["ours"]["mfu_best"] >= 0.75


def bench_preset(preset: int, args: argparse.Namespace, device: torch.device,
                 peaks: PeakTracker) -> dict[str, Any]:
    path = ROOT / "configs" / f"sagan{preset}.yaml"
    preset_cfg = load_run_config(path)
    batch = args.batch or max(1, preset_cfg.train.batch_size // preset_cfg.cluster.max_workers)
    overrides = ["train.ema_start=0", *args.set, f"train.batch_size={batch}"]
    base_cfg = load_config(path, overrides)
    batch = base_cfg.train.batch_size
    cl = args.channels_last != "off"
    variants = {"ours": (cl, args.compile, True)}  # channels_last, compile, fuse_resampling
    if "nchw" in args.also:
        variants["ours_nchw"] = (False, args.compile, True)
    if "compiled" in args.also and not args.compile:
        variants["ours_compiled"] = (cl, True, True)
    if "unfused" in args.also:
        variants["ours_unfused"] = (cl, args.compile, False)
    m = base_cfg.model
    g = torch.Generator(device=device).manual_seed(123)
    x = torch.rand(batch, m.channels, m.image_size, m.image_size, device=device,
                   generator=g) * 2 - 1
    y = (torch.randint(0, m.num_classes, (batch,), device=device, generator=g)
         if m.num_classes > 0 else None)

    def batches():
        while True:
            yield x, y

    it = batches()
    plain = PlainStep(base_cfg, device)
    trainers = {name: GANTrainer(load_config(path, overrides + [
        f"train.channels_last={str(v_cl).lower()}", f"train.compile={str(v_comp).lower()}",
        f"train.fuse_resampling={str(v_fuse).lower()}"]),
        device=device) for name, (v_cl, v_comp, v_fuse) in variants.items()}

    # first step of each: same init, same noise -> the same losses up to rounding (sanity
    # check); for compiled variants this is also where compilation happens
    first_plain = plain.train_step(x, y)
    loss_diff, compile_s = {}, {}
    for name, tr in trainers.items():
        t0 = time.perf_counter()
        first = {k: float(v) for k, v in tr.train_step(it).items() if k.startswith("loss")}
        compile_s[name] = time.perf_counter() - t0
        loss_diff[name] = {k: abs(first[k] - first_plain[k]) for k in first_plain}

    model_flops, per_op = count_flops(lambda: plain.train_step(x, y))
    executed = {"baseline": model_flops}  # what each side really runs (HFU)
    for name, tr in trainers.items():
        executed[name] = count_flops(lambda tr=tr: tr.train_step(it))[0]

    def runner(fn):
        def run() -> None:
            for _ in range(args.steps_per_rep):
                fn()
        return run

    cases = {"baseline": runner(lambda: plain.train_step(x, y))}
    for name, tr in trainers.items():
        cases[name] = runner(lambda tr=tr: tr.train_step(it))
    samples = interleave(cases, args.reps, device, warmup=args.warmup, between=peaks.sample)
    imgs = batch * args.steps_per_rep
    flops = model_flops * args.steps_per_rep
    sides = {name: _side_stats(s, imgs, flops, executed[name] * args.steps_per_rep)
             for name, s in samples.items()}
    speedups = {}
    for name in trainers:
        b, o = samples["baseline"].wall, samples[name].wall
        speedups[name] = {
            "paired_median": paired_ratio(b, o),
            "of_medians": sides["baseline"]["wall_median_s"] / sides[name]["wall_median_s"],
            "of_best": sides["baseline"]["wall_min_s"] / sides[name]["wall_min_s"],
            "of_img_per_cpu_s": sides[name]["img_per_cpu_s"] / sides["baseline"]["img_per_cpu_s"]}
    profiles = {name: profile_ops(fn, args.profile) for name, fn in cases.items()} \
        if args.profile else {}
    ours = trainers["ours"]
    return {
        "preset": preset, "batch": batch, "image_size": m.image_size,
        "g_attention": m.g_attention, "d_attention": m.d_attention,
        "variants": {name: {"channels_last": v[0], "compile": v[1], "fuse_resampling": v[2],
                            "first_step_s": compile_s[name]} for name, v in variants.items()},
        "ours_amp_bf16": ours.amp, "fused_adam": bool(ours.opt_d.defaults.get("fused")),
        "model_flops_per_step": model_flops, "executed_flops_per_step": executed,
        "flops_by_op": per_op, "first_step_loss_abs_diff": loss_diff,
        "sides": sides, "speedup_vs_baseline": speedups, "profiles": profiles,
        "targets": {"speedup_ge_1.25": speedups["ours"]["paired_median"] >= 1.25},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    peaks = PeakTracker(device)
    results = [bench_preset(p, args, device, peaks) for p in args.preset]
    peaks.finish()
    peak = peaks.peak
    for r in results:  # against the best peak seen anywhere in the run
        _add_utilisation(r, peak)
    mm = max(f["mm_flops_per_s"] for f in peaks.full)
    print(f"matmul peak: {peak / 1e9:.0f} GFLOP/s {peaks.full[0]['dtype']} (best of the run; "
          f"torch.mm alone {mm / 1e9:.0f})")
    for r in results:
        ex = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["executed_flops_per_step"].items())
        print(f"preset {r['preset']} (batch {r['batch']}, attention G{r['g_attention']} "
              f"D{r['d_attention']}), model {r['model_flops_per_step'] / 1e9:.1f} GFLOP/step "
              f"(executed: {ex})")
        for name, s in r["sides"].items():
            line = (f"  {name:14s} {s['img_per_s_median']:7.2f} img/s median "
                    f"({s['img_per_s_best']:6.2f} best)  {s['flops_per_s_median'] / 1e9:6.1f} "
                    f"GFLOP/s  MFU {s['mfu_median']:.2f} median ({s['mfu_best']:.2f} best)  "
                    f"HFU {s['hfu_median']:.2f} ({s['hfu_best']:.2f})")
            if name in r["speedup_vs_baseline"]:
                sp = r["speedup_vs_baseline"][name]
                line += (f"  x{sp['paired_median']:.2f} vs baseline (paired; "
                         f"{sp['of_medians']:.2f} of medians, {sp['of_best']:.2f} of best, "
                         f"{sp['of_img_per_cpu_s']:.2f} per CPU-s)")
            print(line)
        for name, prof in r["profiles"].items():
            print(f"  profile of one {name} rep: {prof['total_ms']:.0f} ms self CPU in all ops")
            for op in prof["top"]:
                print(f"    {op['self_ms']:8.1f} ms  {op['calls']:5d}x  {op['op'][:70]}")
        worst = max(v for d in r["first_step_loss_abs_diff"].values() for v in d.values())
        print(f"  first-step |loss - baseline loss| <= {worst:.1e}; targets {r['targets']}")
    payload = {"benchmark": "step", "env": env, "matmul_peak": peaks.report(),
               "load_average_1m_end": os.getloadavg()[0], "args": vars(args), "results": results}
    print(f"-> {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
