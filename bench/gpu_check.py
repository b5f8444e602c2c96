"""One script for the GPU numbers docs/PERFORMANCE.md asks for, in under 8 minutes on one GPU.

    python -m bench.gpu_check                          # CUDA: the full check
    python -m bench.gpu_check --device cpu             # tiny sizes, seconds: CI keeps it working

What it measures, each in the same run (bench/timing.py's matmul peak is today's ceiling):

1. bf16 autocast: does `train.amp=bf16` run, and its step time against fp32 (`train.amp=none`);
2. the SDPA backend PyTorch picks for our SelfAttention at 32 / 64 / 128 px (flash,
   memory-efficient, cuDNN or math), read from the profiler's kernel names;
3. `sagan128` (configs/sagan128.yaml) training steps at batch 64 and 128: img/s, model FLOP
   utilisation (FLOPs counted by FlopCounterMode / step time / matmul peak) and peak memory;
4. Inception pool3 featurisation img/s (the evaluation's cost).

On CPU every size shrinks (width 8, batch 2, 32 px, a few images), so the numbers only say the
script works. Writes JSON (--out) and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import RESULTS, environment, matmul_peak, sync, write_json

import torch
from torch.utils.flop_counter import FlopCounterMode

from sagan.config import load_config
from sagan.training import GANTrainer
# isort: on

ROOT = Path(__file__).resolve().parents[1]
SDPA_KERNELS = {"flash": "flash", "efficient": "efficient", "cudnn": "cudnn", "math": "math"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check: bf16 autocast, SDPA backend per "
                                "resolution, sagan128 img/s + MFU + peak memory at batch 64/128, "
                                "Inception img/s. --device cpu runs tiny sizes (for CI).")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--steps", type=int, help="timed steps per case (default 10; cpu 1)")
    p.add_argument("--out", default=str(RESULTS / "gpu_check.json"), help="JSON output")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.steps is not None and args.steps < 1:
        p.error("--steps: must be >= 1")
    return args


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process RSS high-water


def _batches(cfg: Any, batch: int, device: torch.device):
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, m.channels, m.image_size, m.image_size, generator=g) * 2 - 1)
    y = torch.randint(0, max(m.num_classes, 1), (batch,), generator=g) if m.num_classes else None
    x, y = x.to(device), None if y is None else y.to(device)
    while True:
        yield x, y


def train_case(overrides: list[str], batch: int, steps: int, device: torch.device,
               peak_flops: float) -> dict[str, Any]:
    """Steps of GANTrainer: seconds per step, img/s, model FLOPs per step, MFU, peak memory."""
    cfg = load_config(str(ROOT / "configs" / "sagan128.yaml") if "tiny" not in overrides
                      else None, [o for o in overrides if o != "tiny"]
                      + [f"train.batch_size={batch}", "train.ndis=1"])
    trainer = GANTrainer(cfg, device)
    data = _batches(cfg, batch, device)
    trainer.train_step(data)  # warm-up (cuDNN autotune, allocator)
    sync(device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(data)
    flops = counter.get_total_flops()
    _peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step(data)
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    finite = all(bool(torch.isfinite(v).all()) for v in out.values())
    return {"batch": batch, "amp": cfg.train.amp, "s_per_step": dt, "img_per_s": batch / dt,
            "model_flops_per_step": flops, "mfu": flops / dt / peak_flops,
            "peak_mib": _peak_mib(device), "finite_losses": finite}


def sdpa_backend(px: int, device: torch.device, tiny: bool) -> dict[str, Any]:
    """Which attention kernel PyTorch picks for our SelfAttention on a px x px feature map
    (128 channels, bf16 autocast on CUDA): the kernel names in the profiler say it."""
    from sagan.layers import SelfAttention

    channels = 16 if tiny else 128
    layer = SelfAttention(channels).to(device)
    x = torch.randn(2 if tiny else 16, channels, px, px, device=device)
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    with torch.no_grad(), ctx, torch.profiler.profile() as prof:
        layer(x)
        sync(device)
    names = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key
                    or "flash" in e.key.lower() or "fmha" in e.key.lower()})
    joined = " ".join(names).lower()
    backend = next((b for k, b in SDPA_KERNELS.items() if k in joined), "none seen")
    return {"px": px, "backend": backend, "ops": names}


def inception_rate(device: torch.device, n: int) -> dict[str, Any]:
    """Images per second through the evaluation's featurise path (standard weights when
    installed, else a random-init file of the same network: the same cost)."""
    import sagan.eval as E
    from sagan.eval.weights import InceptionWeightsError

    try:
        weights, which = E.resolve_inception_weights(None, download=False), "standard"
    except InceptionWeightsError:
        from tests.fixtures.inception import build_random_inception_weights

        weights = build_random_inception_weights(Path(tempfile.mkdtemp()) / "w.pth")
        which = "random-init (standard weights not installed)"
    fe = E.feature_extractor(weights, device)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    E.featurize(images[: min(n, 8)], fe, 64, device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    E.featurize(images, fe, 64 if device.type == "cpu" else 256, device)
    sync(device)
    return {"images": n, "img_per_s": n / (time.perf_counter() - t0), "weights": which}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    steps = args.steps or (1 if tiny else 10)
    t_start = time.perf_counter()
    peak = matmul_peak(device, quick=tiny)
    peak_flops = float(peak.get("peak_flops_per_s") or peak.get("mm_flops_per_s"))
    print(f"device {device}: matmul peak {peak_flops / 1e12:.2f} TFLOP/s", flush=True)
    shrink = (["tiny", "model.image_size=32", "model.g_ch=8", "model.d_ch=8",
               "model.num_classes=3", "model.g_attention=[16]", "model.d_attention=[16]"]
              if tiny else [])
    result: dict[str, Any] = {"device": str(device), "tiny": tiny, "matmul_peak": peak}

    amp = {}
    for mode in ("none", "bf16"):
        amp[mode] = train_case([*shrink, f"train.amp={mode}"], 2 if tiny else 64, steps,
                               device, peak_flops)
        print(f"amp={mode}: {amp[mode]['img_per_s']:.1f} img/s, finite "
              f"{amp[mode]['finite_losses']}", flush=True)
    amp["bf16_speedup"] = amp["none"]["s_per_step"] / amp["bf16"]["s_per_step"]
    result["bf16_autocast"] = amp

    result["sdpa"] = [sdpa_backend(px if not tiny else px // 4, device, tiny)
                      for px in (32, 64, 128)]
    for r in result["sdpa"]:
        print(f"SDPA at {r['px']} px: {r['backend']}", flush=True)

    result["sagan128"] = []
    for batch in ((2,) if tiny else (64, 128)):
        r = train_case([*shrink, "train.amp=auto"], batch, steps, device, peak_flops)
        result["sagan128"].append(r)
        print(f"sagan128 batch {batch}: {r['img_per_s']:.1f} img/s, MFU {r['mfu']:.3f}, peak "
              f"{r['peak_mib']:.0f} MiB", flush=True)

    result["inception"] = inception_rate(device, 8 if tiny else 2048)
    print(f"Inception: {result['inception']['img_per_s']:.1f} img/s", flush=True)
    result["seconds"] = time.perf_counter() - t_start
    result["environment"] = environment(device)
    print(f"wrote {write_json(args.out, result)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
