"""Load a generator from wherever it lives: a training checkpoint or an MLflow model.

    loaded = load_generator_any("runs/sagan/checkpoint_000010/checkpoint.pt", "cuda")
    loaded = load_generator_any("models:/sagan-generator@champion", "cpu")
    G, model_cfg, cfg = loaded          # cfg: the full Config when the source has one, else None

Why one function: evaluate.py and sample.py (and notebooks) should not care whether a user hands
them the file a training run wrote or a registry alias. MLflow sources are rebuilt into a full
`sagan.models.Generator` (from the state dict + model config logged beside the exported graph)
so attention maps stay available; models logged as a plain pickled nn.Module are accepted too.
Every failure is a `ModelSourceError` with one line naming the source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sagan.config import Config, ConfigError, ModelConfig
from sagan.errors import one_line

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


class ModelSourceError(RuntimeError):
    """The --model source cannot be loaded; one line naming it and why."""


class LoadedGenerator(NamedTuple):
    generator: nn.Module  # eval mode, on the requested device
    model_cfg: ModelConfig | None
    config: Config | None  # full training config (checkpoints only)


def is_mlflow_source(source: str) -> bool:
    """models:/, runs:/, mlflow-artifacts:/ URIs, or a local MLflow model directory."""
    if source.startswith(MLFLOW_SCHEMES):
        return True
    p = Path(source).expanduser()
    return p.is_dir() and (p / "MLmodel").is_file()


def _find_checkpoint_file(source: str) -> Path:
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():  # a Ray Train checkpoint directory holds one checkpoint file
        files = sorted(f for f in p.iterdir() if f.suffix in CHECKPOINT_SUFFIXES)
        if len(files) == 1:
            return files[0]
        if not files:
            raise ModelSourceError(
                f"model source '{source}': directory has no checkpoint file "
                f"({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) and no MLmodel file")
        raise ModelSourceError(
            f"model source '{source}': directory holds {len(files)} checkpoint files "
            f"({', '.join(f.name for f in files[:4])}); name the file")
    raise ModelSourceError(
        f"model source '{source}': no such checkpoint file, and not an MLflow model URI "
        f"(models:/NAME@ALIAS, runs:/RUN_ID/generator)")


def _load_checkpoint(source: str, device: torch.device) -> LoadedGenerator:
    from sagan.checkpoint import CheckpointError, load_generator

    path = _find_checkpoint_file(source)
    try:
        G, cfg = load_generator(path, device=device)
    except CheckpointError as exc:
        raise ModelSourceError(str(exc)) from None
    return LoadedGenerator(G.eval(), cfg.model, cfg)


def _as_generator(obj: object, source: str) -> nn.Module:
    """Accept a Generator or a wrapper exposing one as `.G` / `.module` / `.generator`."""
    for cand in (obj, *(getattr(obj, a, None) for a in ("G", "generator", "module"))):
        if isinstance(cand, nn.Module) and hasattr(cand, "z_dim") and hasattr(cand,
                                                                             "num_classes"):
            return cand
    raise ModelSourceError(f"model source '{source}': the logged model is not a SAGAN generator "
                           f"(got {type(obj).__name__} without z_dim/num_classes)")


def _load_mlflow(source: str, device: torch.device, tracking_uri: str | None) -> LoadedGenerator:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.registry import load_registered_generator
    from pipelines.tracking import TrackingError

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        try:
            G, model_cfg = load_registered_generator(source, device, tracking_uri)
            return LoadedGenerator(G.eval(), model_cfg, None)
        except TrackingError:
            pass  # not logged by pipelines/registry.py: try the pickled python object
        obj = mlflow.pytorch.load_model(source, map_location=device)
    except MlflowException as exc:
        raise ModelSourceError(f"model source '{source}': MLflow could not load it "
                               f"({one_line(exc, 240)})") from None
    except OSError as exc:
        raise ModelSourceError(f"model source '{source}': {type(exc).__name__}: {exc}") from None
    G = _as_generator(obj, source)
    from sagan.layers import refresh_spectral_norm

    refresh_spectral_norm(G)  # EMA weights may carry stale SN power-iteration vectors
    return LoadedGenerator(G.to(device).eval(), getattr(G, "cfg", None), None)


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; other names are checked (ConfigError)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}': not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device '{name}': CUDA is not available on this machine")
    return name


def load_generator_any(source: str | os.PathLike, device: str | torch.device = "cpu",
                       tracking_uri: str | None = None) -> LoadedGenerator:
    """(generator in eval mode on `device`, its ModelConfig or None, full Config or None).

    `source`: a checkpoint file (or a directory holding exactly one), an MLflow model URI
    (`models:/name@alias`, `models:/name/3`, `runs:/<run_id>/generator`) or a local MLflow
    model directory. An MLflow source is read from `tracking_uri`, else $MLFLOW_TRACKING_URI,
    else the project's sqlite store in ./mlruns (`pipelines.tracking.resolve_tracking_uri`).
    Raises ModelSourceError (one line) when it cannot be loaded.
    """
    source = os.fspath(source)
    device = torch.device(device)
    if is_mlflow_source(source):
        if not tracking_uri:
            from pipelines.config import load_run_config
            from pipelines.tracking import resolve_tracking_uri

            tracking_uri = resolve_tracking_uri(load_run_config(None), project_dir=Path.cwd())
        return _load_mlflow(source, device, tracking_uri)
    return _load_checkpoint(source, device)
