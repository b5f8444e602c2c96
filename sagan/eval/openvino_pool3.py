"""Inception pool3 on CPU through OpenVINO: the same network and weights, faster.

Evaluation is nearly all Inception (bench/inception_speed.py, docs/PERFORMANCE.md): on CPU,
OpenVINO (fp32, precision hint forced: it would pick bf16 by itself where the CPU has it) ran the
network 1.5x faster than our eager channels-last torch path in one process (1.2x for a whole
evaluation on 2 one-thread Ray workers), with features equal to ~1e-6 relative, in seconds of
set-up; `torch.compile` was faster still but compiles for minutes per process. Only the
network after the resize runs in OpenVINO; the uint8 -> 299 px bilinear resize
and the (x - 128) / 128 scaling stay torch-fidelity's own code, so the input is bit-identical.

Every build is checked against the torch network on probe images (MATCH_TOLERANCE); a
converted network that does not match is never used. The conversion (~10 s) is cached per
weights fingerprint and OpenVINO version under `eval.cache_dir`. Pool3 only: IS (logits) and
GPUs stay on torch.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from sagan.eval.weights import POOL_LAYER, InceptionWeightsError

MATCH_TOLERANCE = 1e-4  # max relative L2 difference of pool3 features against torch
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
          "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
          "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
          "AvgPool")


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, 299, 299), exactly as torch-fidelity's InceptionV3
    starts its forward (TF1-compatible bilinear resize, then (x - 128) / 128)."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    return (x - 128) / 128


class Trunk(nn.Module):
    """torch-fidelity's InceptionV3 after the resize: float 299 px -> pool3 (N, 2048)."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*(getattr(extractor, n) for n in _TRUNK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(x), 1)


class OpenVinoPool3(nn.Module):
    """Drop-in for the torch extractor in `featurize`: uint8 batch -> (pool3,)."""

    features_list = [POOL_LAYER]

    def __init__(self, compiled) -> None:
        super().__init__()
        self.compiled = compiled
        self.core = _core()  # set after `compiled`, so released after it: the Core outlives it
        self.runtime = f"OpenVINO {_version()} fp32"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        out = self.compiled(preprocess(x.cpu()).contiguous().numpy())[0]
        return (torch.from_numpy(out.copy()),)


def _version() -> str:
    import openvino as ov

    return ov.__version__.split("-", 1)[0]


@functools.cache
def _core():
    """One OpenVINO Core per process, never released before the networks compiled with it."""
    import openvino as ov

    return ov.Core()


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_images() -> torch.Tensor:
    """Eight smooth, varied uint8 images at two sizes' worth of detail: the match check."""
    g = torch.Generator().manual_seed(0)
    x = nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=64,
                                  mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def _converted(extractor: nn.Module, path: Path):
    """The OpenVINO model of the trunk: read from `path`, else converted and written there."""
    import openvino as ov

    if path.is_file() and path.with_suffix(".bin").is_file():
        return _core().read_model(str(path))
    model = ov.convert_model(Trunk(extractor).eval(), example_input=torch.zeros(1, 3, 299, 299))
    model.reshape([-1, 3, 299, 299])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the .xml appears last: complete
        ov.save_model(model, str(Path(tmp) / path.name), compress_to_fp16=False)
        os.replace(Path(tmp) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(Path(tmp) / path.name, path)
    return model


def openvino_pool3(extractor: nn.Module, fingerprint: str, cache_dir: str | os.PathLike,
                   required: bool) -> nn.Module:
    """OpenVinoPool3 for torch-fidelity `extractor` (on CPU), checked against it; `extractor`
    itself when OpenVINO is missing or does not match and not `required` (else one-line error)."""
    if not available():
        if required:
            raise InceptionWeightsError("eval.runtime: 'openvino' is not installed "
                                        "(pip install openvino), or use eval.runtime=torch")
        return extractor

    root = Path(os.path.expandvars(str(cache_dir))).expanduser() / "openvino"
    path = root / f"inception-pool3-{fingerprint}-ov{_version()}.xml"
    # no CPU pinning: OpenVINO pins its threads to the first cores by default, so two Ray
    # workers on one node (one thread each) shared a core: 7 img/s each against torch's 8.6
    compiled = _core().compile_model(_converted(extractor, path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False})
    fast = OpenVinoPool3(compiled)
    probe = _probe_images()
    with torch.no_grad():
        ref = extractor(probe.contiguous(memory_format=torch.channels_last))[0].double()
    err = float((fast(probe)[0].double() - ref).norm() / ref.norm())
    if err <= MATCH_TOLERANCE:
        return fast
    path.unlink(missing_ok=True)  # a stale or broken conversion: the next build redoes it
    path.with_suffix(".bin").unlink(missing_ok=True)
    if required:
        raise InceptionWeightsError(f"eval.runtime: OpenVINO's pool3 features differ from "
                                    f"torch's by {err:.1e} (> {MATCH_TOLERANCE:g}); use "
                                    f"eval.runtime=torch")
    print(f"warning: OpenVINO's pool3 features differ by {err:.1e}; evaluating with torch",
          flush=True)
    return extractor
