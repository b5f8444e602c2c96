"""Mixed precision: when a run uses bf16 autocast (`train.amp`), and the autocast context.

bf16 pays only where the hardware has bf16 units: CUDA, or CPUs with AVX-512 BF16 or AMX, where
the quickstart's steps ran 1.4x faster at an unchanged FID (docs/PERFORMANCE.md). On other CPUs
oneDNN emulates bf16 and runs slower than fp32, so `bf16_native` stays fp32 there. Numerically
sensitive parts opt out of autocast themselves (spectral norm's sigma, sagan/layers.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls/convs in hardware: CUDA, or a CPU with AVX-512 BF16
    or AMX (torch's own CPU probes; absent probes count as no)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def uses_bf16(amp: str, device: torch.device) -> bool:
    """`train.amp` on `device`: auto = bf16 on CUDA only; bf16_native = bf16 where the hardware
    has it (`native_bf16`); bf16 = always; none = never."""
    if amp == "bf16_native":
        return native_bf16(device)
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def bf16_autocast(enabled: bool, device: torch.device):
    """bf16 autocast on `device` when `enabled`, else a no-op context."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
