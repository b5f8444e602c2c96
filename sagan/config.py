"""Typed configuration of the model, data, training step and evaluation: YAML + dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr_d=2e-4", "model.g_attention=[16,32]"])

Every invalid value is caught here, once, with one line naming the field. The loader is generic
over a dataclass schema: pipelines/config.py extends `Config` with the sections that belong to
whoever runs training (`cluster`, `tracking`), which this library's schema skips unvalidated.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from sagan.errors import one_line

IMAGE_SIZES = (32, 64, 128)
MIN_ATTENTION_RES = 8  # below 8x8 the 2x2-pooled keys leave too few positions to attend over


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted field and says what is allowed."""


@dataclass
class ModelConfig:
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    z_dim: int = 128
    g_ch: int = 32
    d_ch: int = 32
    g_attention: list[int] = field(default_factory=lambda: [16])
    d_attention: list[int] = field(default_factory=lambda: [16])
    attention_heads: int = 1
    attention_pooled: bool = True
    gamma_init: float = 0.0
    gamma_learnable: bool = True


@dataclass
class DataConfig:
    # Local directory, s3://bucket/prefix or http(s):// prefix holding train-*.tar + manifest.json.
    path: str = "data/fashion-mnist-32"
    # S3 endpoint for S3-compatible stores; None -> AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS.
    endpoint_url: str | None = None
    shuffle_buffer: int = 1000
    hflip: bool = False
    loader_workers: int = 2
    # Batches staged ahead on the training device by a background thread (sagan.prefetch), so
    # the host->device copy and layout change overlap the previous step; 0 turns it off.
    prefetch: int = 2
    verify_sha256: bool = False
    # Source used to prepare `path` on first use when it is a missing local directory.
    prepare_source: str | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch, split evenly over the data-parallel workers
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.999
    ndis: int = 1
    loss: str = "hinge"
    ema_decay: float = 0.9999
    ema_start: int = 1000
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    channels_last: bool = True  # measured 1.2-1.4x on CPU (docs/PERFORMANCE.md)
    fuse_resampling: bool = True  # conv+pool / upsample+conv as one stride-2 conv (same function)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    nan_policy: str = "stop"  # stop: raise naming the step; skip: drop the step and count it


@dataclass
class EvalConfig:
    eval_every: int = 0  # 0 disables in-training evaluation
    num_samples: int = 5000
    real_samples: int = 5000
    batch_size: int = 64
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid"])
    inception_weights: str | None = None
    cache_dir: str = "~/.cache/sagan/fidelity"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # Top-level sections that belong to whoever runs training (pipelines/config.py defines
    # and validates them: workers, resources, failures, storage, MLflow); this schema skips them.
    RUNNER_SECTIONS: ClassVar[tuple[str, ...]] = ("cluster", "tracking")
    # Fields that moved out of `train`, at their old dotted names: older configs, checkpoints
    # and command lines still use these, and every loader reads them at the new place.
    MOVED: ClassVar[dict[str, str]] = {
        f"train.{name}": f"cluster.{name}" for name in (
            "workers", "gpus_per_worker", "cpus_per_worker", "max_failures", "storage_path",
            "run_name", "keep_checkpoints")}

    def validate(self) -> None:
        """Raise ConfigError (naming the field) on the first invalid value."""
        _validate(self)


C = TypeVar("C", bound=Config)


# --------------------------------------------------------------------------- resolutions


def g_resolutions(image_size: int) -> list[int]:
    """Feature-map sizes at which the Generator can place attention (outputs of its up-blocks)."""
    return _powers(MIN_ATTENTION_RES, image_size)


def d_resolutions(image_size: int) -> list[int]:
    """Feature-map sizes at which the Discriminator can place attention (outputs of down-blocks)."""
    return _powers(MIN_ATTENTION_RES, image_size // 2)


def _powers(lo: int, hi: int) -> list[int]:
    out, r = [], lo
    while r <= hi:
        out.append(r)
        r *= 2
    return out


# --------------------------------------------------------------------------- building

# A config tree has ~70 leaves; a YAML file whose aliases expand to more values than this is an
# "alias bomb" (a few lines, billions of values once copied) and is refused before the copy.
MAX_CONFIG_VALUES = 100_000
_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def _quote(text: Any) -> str:
    """'text' as typed, unless it holds a line break or control character (then its escaped
    repr), cut to 200 characters: error messages stay one readable line."""
    text = str(text)
    if text.isprintable() and "'" not in text:
        return f"'{text[:200]}{'...' if len(text) > 200 else ''}'"
    return repr(text[:200]) + ("..." if len(text) > 200 else "")


def _short(value: Any) -> str:
    """Bounded repr for error messages: a value built from YAML aliases can be huge (and a
    plain repr of it would never return)."""
    return _REPR.repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert one leaf value against its annotation; raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config field '{name}': expected a list, got {_short(value)}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{name}': expected true/false, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field '{name}': expected an integer, got {_short(value)}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # nan/inf (`.nan`, `.inf`, "1e400") would turn a learning rate into a NaN loss later
        raise ConfigError(f"config field '{name}': expected a finite number, got {_short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config field '{name}': expected a string, got {_short(value)}")
    raise ConfigError(f"config field '{name}': unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigError(f"config section {_quote(where)}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"config: unknown key {_quote(dotted)} "
                f"(valid keys here: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], dotted)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, dotted)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"config override {_quote(item)}: expected KEY=VALUE, "
                          "e.g. train.lr_d=2e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config override {_quote(item)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config override {_quote(key)}: cannot parse value {raw[:200]!r} "
                          f"({one_line(exc)})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"config override {_quote(key)}: value nested too deeply") from None
    return key.split("."), value


def _moved(dotted: str, schema: type[Config]) -> list[str]:
    """`dotted` at its current place (see Config.MOVED), split into its parts."""
    return schema.MOVED.get(dotted, dotted).split(".")


def _relocate(data: dict, schema: type[Config]) -> dict:
    """Move fields from their old place (Config.MOVED) to the new one, in a loaded file."""
    for old, new in schema.MOVED.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        section = data.get(osec)
        if not isinstance(section, dict) or oname not in section:
            continue
        value, target = section.pop(oname), data.setdefault(nsec, {})
        if isinstance(target, dict):  # else the new section itself is refused when built
            if nname in target:
                raise ConfigError(f"config: {_quote(old)} and {_quote(new)} are the same field "
                                  f"(it moved); set only {_quote(new)}")
            target[nname] = value
    return data


def apply_overrides(data: dict, overrides: list[str], schema: type[Config] = Config) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) onto a nested dict, in order."""
    for item in overrides:
        parts, value = _parse_override(item)
        parts = _moved(".".join(parts), schema)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"config override {_quote(item)}: {_quote(part)} is not "
                                  "a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None,
                     schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Build and validate a `schema` config (default: this library's) from a plain dict (e.g. a
    logged YAML) plus overrides; sections the schema leaves to its runner are skipped."""
    data = _deepcopy(data or {})
    if isinstance(data, dict):
        data = _relocate(data, schema)
    data = apply_overrides(data, overrides or [], schema)
    for name in schema.RUNNER_SECTIONS:
        data.pop(name, None)
    cfg = _build(schema, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Load YAML `path` (None: all defaults), apply dotted overrides, validate, return a
    `schema` config (default: this library's `Config`)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}': not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}': invalid YAML ({one_line(exc)})") from None
        except RecursionError:  # PyYAML's composer recurses once per nesting level
            raise ConfigError(f"config file '{p}': invalid YAML (nested too deeply)") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{p}': not UTF-8 text ({exc.reason})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}': top level must be a mapping")
    return config_from_dict(data, overrides, schema)


def _deepcopy(data: Any, budget: list[int] | None = None) -> Any:
    """Copy of nested dicts/lists; ConfigError past MAX_CONFIG_VALUES values (alias bombs)."""
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"config: more than {MAX_CONFIG_VALUES} values (YAML aliases "
                          "expanding without bound?)")
    if isinstance(data, dict):
        return {k: _deepcopy(v, budget) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v, budget) for v in data]
    return data


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted-key view of the whole resolved config (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            out[prefix] = node

    walk(to_dict(cfg), "")
    return out


# --------------------------------------------------------------------------- validation


def require(cond: bool, name: str, msg: str) -> None:
    """ConfigError "config field 'name': msg" unless `cond`."""
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def validate(cfg: Config) -> None:
    """Raise ConfigError (naming the field) on the first invalid value of `cfg`, all of it
    (a runner's schema adds its own checks to `Config.validate`)."""
    cfg.validate()


def _validate(cfg: Config) -> None:
    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval
    require(m.image_size in IMAGE_SIZES, "model.image_size",
             f"must be one of {list(IMAGE_SIZES)}, got {m.image_size}")
    require(m.channels in (1, 3), "model.channels", f"must be 1 or 3, got {m.channels}")
    require(m.num_classes >= 0, "model.num_classes", f"must be >= 0, got {m.num_classes}")
    require(m.z_dim > 0, "model.z_dim", f"must be > 0, got {m.z_dim}")
    for name, ch in (("model.g_ch", m.g_ch), ("model.d_ch", m.d_ch)):
        require(ch >= 8 and ch % 8 == 0, name, f"must be a positive multiple of 8, got {ch}")
    require(m.attention_heads >= 1, "model.attention_heads",
             f"must be >= 1, got {m.attention_heads}")
    for name, placement, allowed in (
        ("model.g_attention", m.g_attention, g_resolutions(m.image_size)),
        ("model.d_attention", m.d_attention, d_resolutions(m.image_size)),
    ):
        for r in placement:
            require(r in allowed, name,
                     f"resolution {r} does not exist in this network at image_size "
                     f"{m.image_size}; allowed: {allowed}")
        require(len(set(placement)) == len(placement), name, f"duplicate entries in {placement}")

    require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    require(d.loader_workers >= 0, "data.loader_workers", "must be >= 0")
    require(d.prefetch >= 0, "data.prefetch", "must be >= 0")
    require(bool(d.path), "data.path", "must not be empty")

    require(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    for name in ("lr_g", "lr_d"):
        v = getattr(t, name)
        require(v > 0 and v == v, f"train.{name}", f"must be > 0, got {v}")
    require(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    require(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    require(t.ndis >= 1, "train.ndis", f"must be >= 1, got {t.ndis}")
    require(t.loss in ("hinge", "ns"), "train.loss", f"must be 'hinge' or 'ns', got {t.loss!r}")
    require(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    require(t.ema_start >= 0, "train.ema_start", "must be >= 0")
    require(t.amp in ("auto", "bf16", "none"), "train.amp",
             f"must be 'auto', 'bf16' or 'none', got {t.amp!r}")
    for name in ("log_every", "ckpt_every", "sample_every"):
        require(getattr(t, name) >= 0, f"train.{name}", "must be >= 0 (0 disables)")
    require(t.nan_policy in ("stop", "skip"), "train.nan_policy",
             f"must be 'stop' or 'skip', got {t.nan_policy!r}")

    require(e.eval_every >= 0, "eval.eval_every", "must be >= 0 (0 disables)")
    require(e.num_samples > 1, "eval.num_samples", "must be > 1")
    require(e.real_samples > 1, "eval.real_samples", "must be > 1")
    require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    for i, metric in enumerate(e.metrics):
        require(metric in ("fid", "kid", "is"), f"eval.metrics[{i}]",
                 f"must be one of fid, kid, is; got {metric!r}")
