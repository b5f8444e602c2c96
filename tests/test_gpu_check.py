"""bench/gpu_check.py keeps working without a GPU: `--device cpu` runs every measurement at tiny
sizes and writes the JSON the GPU run writes (values checked for shape and sanity only: CPU
numbers of a width-8 model say nothing about a GPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path: Path) -> None:
    from bench import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] and r["device"] == "cpu"
    amp = r["bf16_autocast"]
    assert amp["none"]["finite_losses"] and amp["bf16"]["finite_losses"]
    assert amp["bf16"]["amp"] == "bf16" and amp["bf16_speedup"] > 0
    assert [s["px"] for s in r["sdpa"]] == [8, 16, 32]
    assert all(s["backend"] != "none seen" for s in r["sdpa"]), r["sdpa"]
    (case,) = r["sagan128"]
    assert case["model_flops_per_step"] > 0 and 0 < case["mfu"] < 1.5
    assert case["peak_mib"] > 0 and math.isfinite(case["img_per_s"])
    assert r["inception"]["img_per_s"] > 0


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda" in capsys.readouterr().err
