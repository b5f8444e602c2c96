"""Timing, matmul-peak and result-writing helpers shared by bench/step.py and bench/attention.py.

Why these exist: the benchmarks run on shared machines (here: 2 CPU cores that other jobs use at
the same time), where a single timing can be off by 2-10x. So every comparison

- runs its baseline and its candidate in the same process, interleaved rep by rep (ABAB..., the
  order flipped on every other rep so slow drifts hit both sides alike), and reports the median,
  the minimum (the least-disturbed rep) and the median of the per-rep paired ratios;
- measures the device's matmul throughput in the same run, so MFU is relative to what this
  machine delivered today, not to a datasheet number;
- records process CPU time next to wall time, and the load average, so a reader can tell a
  contended run from a quiet one.

Import this module *before* torch (the scripts do): it defaults OMP_WAIT_POLICY to PASSIVE,
because with another process on the same cores, OpenMP threads that spin-wait at every barrier
make conv kernels 2-3x slower (measured; docs/PERFORMANCE.md). Set OMP_WAIT_POLICY=ACTIVE to
measure the spin-waiting default instead.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP environment is set)
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels are asynchronous; CPU ops are not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Wall and process-CPU seconds of each timed repetition of one case."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"wall_median_s": statistics.median(self.wall), "wall_min_s": min(self.wall),
                "wall_max_s": max(self.wall), "cpu_median_s": statistics.median(self.cpu),
                "reps": len(self.wall), "wall_s": [round(t, 4) for t in self.wall],
                "cpu_s": [round(t, 4) for t in self.cpu]}


def interleave(cases: dict[str, Callable[[], Any]], reps: int, device: torch.device,
               warmup: int = 1, between: Callable[[], Any] | None = None) -> dict[str, Samples]:
    """Time every case `reps` times, interleaved (A B, then B A, ...), after `warmup` untimed
    calls each. Each timed call ends with a device sync, so queued GPU work is counted.
    `between` (e.g. `PeakTracker.sample`) runs untimed after every round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
        sync(device)
    out = {name: Samples() for name in cases}
    names = list(cases)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            sync(device)
            out[name].wall.append(time.perf_counter() - t0)
            out[name].cpu.append(time.process_time() - c0)
        if between is not None:
            between()
    return out


def paired_ratio(base: list[float], ours: list[float]) -> float:
    """Median over reps of base_i / ours_i: each pair ran back to back, under similar load."""
    return statistics.median(b / o for b, o in zip(base, ours, strict=True))


def _best_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype | None = None,
                reps: int = 5, quick: bool = False) -> dict[str, Any]:
    """The device's dense matmul throughput (FLOP/s), best of `reps` over a few GEMM shapes,
    measured now.

    GPU: `torch.mm` in `dtype` (default bf16, the dtype training runs in), 8192^3.
    `quick`: a single shape, and on CPU only oneDNN (for sampling between timing rounds).
    CPU: fp32, and the max over two GEMM libraries torch ships, because they differ a lot on some
    CPUs: `torch.mm` (MKL in these wheels; on AMD CPUs it runs its AVX2 code path) and the same
    GEMMs done by oneDNN as 1x1 convolutions ((M x K) channels_last activations times a (K x N)
    weight), oneDNN being the library that runs every conv of the model. Using only the slower
    one would let MFU pass 1.0; the peak is the best matmul this machine delivered in this run.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ([(8192, 8192, 8192)] if device.type == "cuda"
              else [(4096, 4096, 4096), (4096, 1024, 1024), (2048, 2048, 2048)])
    if quick:  # one shape, the best one on the CPUs measured so far
        shapes = shapes[:1] if device.type == "cuda" else [(4096, 1024, 1024)]
    result: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "shapes_mkn": shapes}
    mm_best = onednn_best = 0.0
    for m, k, n in shapes:
        flops = 2.0 * m * k * n
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)
        if not (quick and device.type == "cpu"):
            mm_s = _best_time(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), device, reps)
            mm_best = max(mm_best, flops / mm_s)
        if device.type == "cpu":
            # (1, K, M, 1) channels_last activations = an (M x K) row-major matrix; 1x1 kernel
            x = torch.randn(1, k, m, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(n, k, 1, 1, dtype=dtype)
            conv_s = _best_time(lambda x=x, w=w: F.conv2d(x, w), device, reps)
            onednn_best = max(onednn_best, flops / conv_s)
    result["mm_flops_per_s"] = mm_best
    if device.type == "cpu":
        result["onednn_gemm_flops_per_s"] = onednn_best
    result["peak_flops_per_s"] = max(mm_best, onednn_best)
    return result


class PeakTracker:
    """The best matmul throughput seen during a run: a full `matmul_peak` at the start and end,
    plus one quick GEMM between timing rounds, so that a quiet moment anywhere in the run sets
    the peak (on a shared machine a peak measured in a busy moment would inflate MFU)."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        self.full = [matmul_peak(device, dtype)]
        self.dtype = dtype
        self.quick: list[float] = []

    def sample(self) -> None:
        self.quick.append(matmul_peak(self.device, self.dtype, reps=2, quick=True)
                          ["peak_flops_per_s"])

    def finish(self) -> None:
        self.full.append(matmul_peak(self.device, self.dtype))

    @property
    def peak(self) -> float:
        return max([r["peak_flops_per_s"] for r in self.full] + self.quick)

    def report(self) -> dict[str, Any]:
        return {"full": self.full, "quick_between_rounds": self.quick,
                "used_flops_per_s": self.peak}


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to judge the numbers: versions, device, threads, load."""
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
