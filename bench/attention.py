"""Peak memory and time of one SAGAN attention layer, forward + backward: SDPA vs the N x N map.

    python -m bench.attention                          # CPU: feat32/64/128, batch 64, C=64
    python -m bench.attention --device cuda --dtype bf16 --budget-gib 40   # GPU

Paths, all on the same layer weights (SelfAttention(C), official pooled form: q/k C/8, v C/2,
keys/values 2x2 max-pooled, no 1/sqrt(d) scaling), in train mode, gamma = 1, input gradient on:

* ``materialised``: the explicit form — softmax(q kᵀ) as a (B, N, N/4) tensor, then bmm with v.
  This is the baseline.
* ``sdpa_unpadded``: `F.scaled_dot_product_attention` with q/k at C/8 and v at C/2
  (`pad_qk=False`); on CPU this head-dim mismatch sends SDPA to its math kernel.
* ``sdpa``: ours — q/k zero-padded to v's width (`pad_qk=True`, the default), which leaves q·kᵀ
  unchanged and lets the fused (flash) kernel run.

Peak memory is the peak of *extra* bytes allocated during forward + backward (inputs and
weights excluded). CPU: from the allocation timeline of `torch.profiler` (profile_memory=True,
the running sum of its allocator CREATE/DESTROY events — checked at start-up against a tensor of
known size). GPU: `torch.cuda.max_memory_allocated` minus the bytes allocated before.
The materialised path's batch is halved until its estimated peak fits `--budget-gib` (at feat128
the N x N/4 map alone is 256 MiB per sample in fp32); ours is then measured both at that batch
(the like-for-like ratio) and at the full batch. Times: interleaved reps, median.
Target (issue 8): sdpa peak <= 25% of materialised at feat64; feat128 runs at all.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import RESULTS, environment, interleave, sync, write_json

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sagan.layers import SelfAttention
# isort: on

MiB = 2 ** 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("materialised", "sdpa_unpadded", "sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--feats", type=int, nargs="+", default=[32, 64, 128],
                    help="feature-map sizes (attention over feat x feat positions)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=64,
                    help="C of the layer (64: q/k 8, v 32 — D's width at feat64 of the 128 "
                         "preset, and the issue's 405 MiB vs 29 MiB case)")
    ap.add_argument("--reps", type=int, default=3, help="timed reps per path (interleaved)")
    ap.add_argument("--budget-gib", type=float, default=5.0,
                    help="memory budget for the materialised path; its batch is halved to fit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="autocast dtype on GPU (bf16 enables the flash kernel); CPU: fp32")
    ap.add_argument("--no-claim-check", action="store_true",
                    help="skip the issue's feat64 batch-8 check (405 MiB vs 29 MiB)")
    ap.add_argument("--out", default=str(RESULTS / "attention.json"))
    return ap.parse_args(argv)


def materialised_forward(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """SelfAttention as a plain implementation writes it: the full softmax map, then bmm."""
    b, c, h, w = x.shape
    q, k, v = layer.qkv(x)  # (B, heads, N, dq), (B, heads, M, dq), (B, heads, M, dv)
    heads, n, m = q.shape[1], q.shape[2], k.shape[2]
    q, k, v = q.reshape(b * heads, n, -1), k.reshape(b * heads, m, -1), v.reshape(b * heads, m, -1)
    attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B*heads, N, M)
    o = torch.bmm(attn, v).view(b, heads, n, -1).transpose(2, 3).reshape(b, layer.v_dim, h, w)
    return x + layer.gamma * layer.out(o)


def make_layer(channels: int, pad_qk: bool, device: torch.device) -> SelfAttention:
    torch.manual_seed(0)  # the same weights for every path
    layer = SelfAttention(channels, pad_qk=pad_qk).to(device)
    with torch.no_grad():
        layer.gamma.fill_(1.0)
    return layer.train()


def make_step(path: str, channels: int, feat: int, batch: int, device: torch.device,
              dtype: torch.dtype):
    """A closure running forward + backward of one layer on fixed inputs."""
    layer = make_layer(channels, pad_qk=path != "sdpa_unpadded", device=device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, channels, feat, feat, device=device, generator=g, requires_grad=True)
    grad = torch.randn(batch, channels, feat, feat, device=device, generator=g)
    autocast = torch.autocast(device_type=device.type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast:
            out = materialised_forward(layer, x) if path == "materialised" else layer(x)
        out.float().backward(grad)

    return step


def make_core_step(pad: bool, device: torch.device, dtype: torch.dtype, batch: int = 8,
                   n: int = 64 * 64, dq: int = 8, dv: int = 32):
    """SDPA alone, forward + backward, on leaf q (B,1,N,dq), k (B,1,N/4,dq), v (B,1,N/4,dv);
    `pad` zero-pads q and k to dv as SelfAttention(pad_qk=True) does."""
    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(batch, 1, n, dq, device=device, generator=g, requires_grad=True)
    k = torch.randn(batch, 1, n // 4, dq, device=device, generator=g, requires_grad=True)
    v = torch.randn(batch, 1, n // 4, dv, device=device, generator=g, requires_grad=True)
    autocast = torch.autocast(device_type=device.type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        with autocast:
            qq, kk = (F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))) if pad else (q, k)
            o = F.scaled_dot_product_attention(qq, kk, v, scale=1.0)
        o.float().sum().backward()

    return step


def cpu_peak_bytes(fn) -> tuple[int, list[str]]:
    """Peak of extra CPU bytes allocated while `fn` runs, plus the names of the attention
    kernels that ran. From the profiler's memory timeline (`_memory_profile().timeline`, the
    data behind `export_memory_timeline`): every allocator event, temporaries inside an op
    included; tensors that existed before the profile (inputs, weights) are not counted."""
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    kernels = sorted({e.name for e in prof.events()
                      if e.name.startswith("aten::") and "attention" in e.name
                      and not e.name.endswith("backward")})
    return peak, kernels


def cuda_peak_bytes(fn, device: torch.device) -> tuple[int, list[str]]:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    kernels = sorted({e.name for e in prof.events()
                      if e.name.startswith("aten::") and "attention" in e.name
                      and not e.name.endswith("backward")})
    return peak, kernels


def peak_bytes(fn, device: torch.device) -> tuple[int, list[str]]:
    fn()  # warm-up: one-off allocations (SN vectors, grads) outside the measurement
    return cuda_peak_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)


def check_cpu_meter() -> int:
    """The CPU meter must see a 64 MiB tensor as >= 64 MiB; returns what it saw."""
    seen, _ = cpu_peak_bytes(lambda: torch.empty(64 * MiB, dtype=torch.uint8).fill_(1))
    if not 64 * MiB <= seen < 65 * MiB:
        raise RuntimeError(f"profiler memory meter is off: saw {seen / MiB:.1f} MiB for 64 MiB")
    return seen


def materialised_batch(channels: int, feat: int, batch: int, budget_gib: float,
                       elem_bytes: int) -> int:
    """Largest batch (halving from `batch`) whose materialised map traffic fits the budget.
    Estimate: ~4 live N x M tensors (scores, softmax, and their gradients) per sample."""
    n = feat * feat
    per_sample = 4 * n * (n // 4) * elem_bytes + 16 * channels * n * 4
    b = batch
    while b > 1 and b * per_sample > budget_gib * 2 ** 30:
        b //= 2
    return b


def measure(cases: dict[str, Any], device: torch.device, reps: int) -> dict[str, dict]:
    """Peak memory (one profiled run each) and interleaved timings of closures."""
    out: dict[str, dict] = {}
    for name, fn in cases.items():
        peak, kernels = peak_bytes(fn, device)
        out[name] = {"peak_mib": peak / MiB, "kernels": kernels}
    samples = interleave(cases, reps, device, warmup=0)
    for name, s in samples.items():
        out[name].update(s.summary())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    result: dict[str, Any] = {"benchmark": "attention", "env": environment(device),
                              "channels": args.channels, "dtype": str(dtype),
                              "memory_method": (
                                  "torch.cuda.max_memory_allocated" if device.type == "cuda"
                                  else "torch.profiler memory timeline (allocator events)")}
    if device.type == "cpu":
        result["meter_check_64MiB"] = check_cpu_meter() / MiB
    rows = []
    if not args.no_claim_check:
        # issue 8's measurement: feat64, batch 8, C=64 (q/k dim 8, v dim 32), whole layer ...
        cases = {p: make_step(p, 64, 64, 8, device, dtype) for p in PATHS}
        claim = measure(cases, device, args.reps)
        # ... and the SDPA call alone, on q/k/v tensors (what "405 MiB vs 29 MiB" refers to)
        core = measure({"sdpa_core_unpadded": make_core_step(False, device, dtype),
                        "sdpa_core_padded": make_core_step(True, device, dtype)},
                       device, args.reps)
        claim.update(core)
        result["claim_check_feat64_batch8"] = claim
        print("claim check (feat64, batch 8, C=64: q/k dim 8, v dim 32), forward + backward:")
        for p, c in claim.items():
            print(f"  {p:18s} peak {c['peak_mib']:8.1f} MiB  "
                  f"time {c['wall_median_s'] * 1e3:8.1f} ms  {', '.join(c['kernels'])}")
        for a, b in (("sdpa_unpadded", "sdpa"), ("sdpa_core_unpadded", "sdpa_core_padded")):
            print(f"  {a} / {b}: memory {claim[a]['peak_mib'] / claim[b]['peak_mib']:.1f}x, "
                  f"time {claim[a]['wall_median_s'] / claim[b]['wall_median_s']:.2f}x")
    for feat in args.feats:
        bm = materialised_batch(args.channels, feat, args.batch, args.budget_gib, elem)
        cases = {
            "materialised": make_step("materialised", args.channels, feat, bm, device, dtype),
            "sdpa": make_step("sdpa", args.channels, feat, bm, device, dtype),
        }
        same = measure(cases, device, args.reps)
        row: dict[str, Any] = {"feat": feat, "batch": bm, "materialised": same["materialised"],
                               "sdpa": same["sdpa"],
                               "memory_ratio": same["sdpa"]["peak_mib"]
                               / same["materialised"]["peak_mib"],
                               "speedup": same["materialised"]["wall_median_s"]
                               / same["sdpa"]["wall_median_s"]}
        if bm != args.batch:
            full = measure({"sdpa": make_step("sdpa", args.channels, feat, args.batch, device,
                                              dtype)}, device, args.reps)
            row["sdpa_full_batch"] = {"batch": args.batch, **full["sdpa"]}
        rows.append(row)
        print(f"feat{feat:<4d} batch {bm:3d}: materialised {row['materialised']['peak_mib']:9.1f}"
              f" MiB {row['materialised']['wall_median_s'] * 1e3:9.1f} ms | sdpa "
              f"{row['sdpa']['peak_mib']:8.1f} MiB {row['sdpa']['wall_median_s'] * 1e3:8.1f} ms"
              f" | memory {row['memory_ratio'] * 100:5.1f}% of materialised, "
              f"{row['speedup']:.2f}x faster")
        if "sdpa_full_batch" in row:
            f = row["sdpa_full_batch"]
            print(f"           batch {args.batch:3d}: sdpa {f['peak_mib']:.1f} MiB "
                  f"{f['wall_median_s'] * 1e3:.1f} ms (materialised does not fit "
                  f"{args.budget_gib} GiB here)")
    result["rows"] = rows
    by_feat = {r["feat"]: r for r in rows}
    result["load_average_1m_end"] = os.getloadavg()[0]
    result["targets"] = {
        "feat64_memory_le_25pct": (by_feat[64]["memory_ratio"] <= 0.25) if 64 in by_feat
        else None,
        "feat128_runs": 128 in by_feat,
    }
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    path = write_json(args.out, result)
    print(f"targets: {result['targets']}  ->  {path}")


if __name__ == "__main__":
    main()
