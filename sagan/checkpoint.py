"""Save/restore the whole training state, atomically, and load generators from checkpoints.

Why atomic: a preempted node or a full disk mid-write must never leave a half-written file where
the last good checkpoint used to be. We write to a temp file in the same directory, fsync, and
`os.replace` (atomic on POSIX). Loading uses `weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sagan.config import Config, ConfigError, config_from_dict, to_dict
from sagan.errors import one_line
from sagan.models import Generator

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "step", "G", "D", "G_ema", "opt_g", "opt_d", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model: one clear line."""


def save_checkpoint(path: str | os.PathLike, trainer: Any, extra: dict | None = None) -> Path:
    """Write `trainer.state_dict()` + config to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT_VERSION, **trainer.state_dict(), "config": to_dict(trainer.cfg),
             "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt & co. stay what they are
            raise
        raise CheckpointError(f"checkpoint '{path}': write failed ({_os_reason(exc)}); "
                              "any previous checkpoint at that path is unchanged") from exc
    return path


def _os_reason(exc: BaseException) -> str:
    """The OS error behind a failed write (torch's zip writer reports a full disk as
    'unexpected pos N vs M' and keeps the OSError only as the exception's context)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}, errno {seen.errno}"
        seen = seen.__cause__ or seen.__context__
    return one_line(exc)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with weights_only=True and check its top-level layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}': file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint '{path}': unreadable ({one_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}': not a SAGAN checkpoint (top level is "
                              f"{type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}': not a SAGAN checkpoint (missing keys: "
                              f"{', '.join(missing)})")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}': format {state['format']!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    return state


def checkpoint_config(state: dict, where: str = "checkpoint") -> Config:
    try:
        return config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{where}: stored config is invalid ({exc})") from None


def _describe_mismatch(module: torch.nn.Module, sd: dict) -> str:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd)
                    if hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape))
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts) or "incompatible tensors"


def restore_trainer(trainer: Any, state: dict, where: str = "checkpoint") -> None:
    """Load `state` into `trainer`; tampered/mismatched tensors give one clear CheckpointError."""
    for key, module in (("G", trainer.G_raw), ("D", trainer.D_raw), ("G_ema", trainer.ema)):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{where}: entry '{key}' is not a state dict")
        try:
            module.load_state_dict(state[key], strict=True)
        except (RuntimeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: '{key}' weights do not match this model "
                                  f"({_describe_mismatch(module, state[key])})") from None
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{where}: optimizer/RNG state does not match "
                              f"({one_line(exc)})") from None


def ema_weights(state: dict) -> dict[str, torch.Tensor]:
    """The EMA generator of a checkpoint as a plain `Generator` state dict. The trainer keeps
    the EMA in an `AveragedModel`, whose state dict prefixes the generator's keys with
    `module.` and adds its `n_averaged` counter."""
    prefix = "module."
    return {k[len(prefix):]: v for k, v in state["G_ema"].items() if k.startswith(prefix)}


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu",
                   ema: bool = True) -> tuple[Generator, Config]:
    """The (EMA by default) generator of a training checkpoint, eval mode, plus its Config."""
    state = load_checkpoint(path, map_location=device)
    cfg = checkpoint_config(state, f"checkpoint '{path}'")
    G = Generator(cfg.model).to(device)
    sd = ema_weights(state) if ema else state["G"]
    try:
        G.load_state_dict(sd, strict=True)
    except RuntimeError:
        raise CheckpointError(f"checkpoint '{path}': generator weights do not match its config "
                              f"({_describe_mismatch(G, sd)})") from None
    if ema:
        from sagan.layers import refresh_spectral_norm

        refresh_spectral_norm(G)
    return G.eval(), cfg
