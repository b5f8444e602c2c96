"""Typed configuration of the model, data, training step and evaluation: YAML + dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr_d=2e-4", "model.g_attention=[16,32]"])

Every invalid value is caught here, once, with one line naming the field. The loader is generic
over a dataclass schema (the machinery: sagan/schema.py): pipelines/config.py extends `Config`
with the sections that belong to whoever runs training (`cluster`, `tracking`), which this
library's schema skips unvalidated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from sagan.schema import ConfigError as ConfigError  # part of this module's API
from sagan.schema import (
    apply_overrides,
    bounded_copy,
    build,
    read_yaml,
    relocate,
)
from sagan.schema import require as require

IMAGE_SIZES = (32, 64, 128)
CBN_FORMS = ("sn", "plain")
AMP_MODES = ("auto", "bf16_native", "bf16", "none")  # sagan/precision.py uses_bf16
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # sagan/diffaugment.py
FITS = ("resize", "crop", "pad")  # how images meet image_size: sagan.data.transform_image
EVAL_RUNTIMES = ("auto", "torch", "openvino")  # eval.runtime: sagan/eval/openvino_pool3.py
MIN_ATTENTION_RES = 8  # below 8x8 the 2x2-pooled keys leave too few positions to attend over


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
    # Width of each stage as a multiple of g_ch / d_ch; None: the tables in sagan/models.py.
    # G lists the 4x4 input then each up-block's output; D each down-block then the last block.
    # A taper (G [16, 8, 4, 2], D [2, 4, 8, 16]) puts width where the maps are small: at 32 px it
    # trains several times faster per step than the constant table at the same parameter count.
    g_mults: list[int] | None = None
    d_mults: list[int] | None = None
    # Class-conditional BN: "sn" (BigGAN-PyTorch: gain = 1 + SN embedding, bias = SN embedding)
    # or "plain" (the official SAGAN code: per-class gamma from 1 and beta from 0, no SN, so a
    # class's gain can move by lr per step and conditioning shows early on small budgets).
    cbn: str = "sn"


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
    # How long a stream waits for an object store that does not answer at all (connection
    # refused, timeouts) before the loader gives up with StorageUnreachable; meanwhile training
    # pauses, with one line a minute, and nothing is skipped (docs/RELIABILITY.md).
    max_outage_s: float = 300.0
    # Source used to prepare `path` on first use when it is a missing local directory.
    prepare_source: str | None = None
    # Shards written by others (`path` a brace list or a prefix of .tar files; docs/DATA.md):
    # where their index lives (None: beside them; set it for read-only buckets), which member
    # holds the image (None: the first of jpg, jpeg, png, webp), which holds the label (`cls`,
    # `json:FIELD`, or None for none), and how images are fitted to model.image_size in the
    # loader workers: `crop` (centre-crop, the usual for photos), `resize` (letterbox) or `pad`,
    # as prepare_data.py --fit. Our own shards ignore these: they are already the model's size.
    index: str | None = None
    image_key: str | None = None
    label: str | None = "cls"
    fit: str = "crop"


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
    # fraction of `steps` at the end over which lr_g and lr_d decay linearly to 0 (0 = constant)
    lr_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_start: int = 1000
    # BN statistics of the EMA generator, measured on this many of its own samples whenever it
    # is used or saved (BigGAN's standing stats); 0 = the raw G's running statistics.
    ema_standing_samples: int = 2000
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16_native: bf16 also on CPUs with AVX-512 BF16
    # or AMX (1.4x faster steps measured, docs/PERFORMANCE.md); bf16: always; none: never
    amp: str = "auto"
    compile: bool = False
    channels_last: bool = True  # measured 1.2-1.4x on CPU (docs/PERFORMANCE.md)
    fuse_resampling: bool = True  # conv+pool / upsample+conv as one stride-2 conv (same function)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    nan_policy: str = "stop"  # stop: raise naming the step; skip: drop the step and count it
    # DiffAugment policies applied to every image D sees, real and fake, in both steps
    # (sagan/diffaugment.py): any of color, translation, cutout; [] is off. For small datasets.
    diffaugment: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    eval_every: int = 0  # 0 disables in-training evaluation
    # Held-out images the generator is scored against (a prepared shard path, like data.path;
    # None: data.path itself, i.e. FID against the training set, which flatters memorisation).
    real_path: str | None = None
    num_samples: int = 5000
    real_samples: int = 5000
    batch_size: int = 64
    # names from the registry in sagan/eval/names.py; default FID + KID (the cost is stated there)
    metrics: list[str] = field(default_factory=lambda: _default_metrics())
    inception_weights: str | None = None
    cache_dir: str = "~/.cache/sagan/fidelity"
    # pool3 on CPU: torch, or opt-in auto / openvino = OpenVINO (same features, 1.2x per
    # evaluation in training; the quickstart's choice; docs/EVALUATION.md)
    runtime: str = "torch"


def _default_metrics() -> list[str]:
    from sagan.eval.names import DEFAULT_METRICS  # lazily: sagan.eval imports this module

    return list(DEFAULT_METRICS)


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
            "run_name", "keep_checkpoints", "placement")}

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


# --------------------------------------------------------------------------- loading


def config_from_dict(data: dict, overrides: list[str] | None = None,
                     schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Build and validate a `schema` config (default: this library's) from a plain dict (e.g. a
    logged YAML) plus overrides; sections the schema leaves to its runner are skipped."""
    data = bounded_copy(data or {})
    if isinstance(data, dict):
        data = relocate(data, schema.MOVED)
    data = apply_overrides(data, overrides or [], schema.MOVED)
    for name in schema.RUNNER_SECTIONS:
        data.pop(name, None)
    cfg = build(schema, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Load YAML `path` (None: all defaults), apply dotted overrides, validate, return a
    `schema` config (default: this library's `Config`)."""
    return config_from_dict(read_yaml(path) if path is not None else {}, overrides, schema)


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
    require(m.cbn in CBN_FORMS, "model.cbn", f"must be one of {list(CBN_FORMS)}, got {m.cbn!r}")
    stages = int(math.log2(m.image_size // 4)) + 1 if m.image_size in IMAGE_SIZES else 0
    for name, mults in (("model.g_mults", m.g_mults), ("model.d_mults", m.d_mults)):
        if mults is not None:
            require(len(mults) == stages and all(k >= 1 for k in mults), name,
                    f"must list {stages} positive multipliers at image_size {m.image_size} "
                    f"(the 4x4 stage and one per block), got {mults}")
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
    require(d.max_outage_s > 0, "data.max_outage_s", f"must be > 0 seconds, got {d.max_outage_s}")
    require(bool(d.path), "data.path", "must not be empty")
    require(d.fit in FITS, "data.fit", f"must be one of {', '.join(FITS)}; got {d.fit!r}")
    require(d.image_key is None or (bool(d.image_key) and "." not in d.image_key),
            "data.image_key", f"must be a member key such as jpg (no dot), got {d.image_key!r}")
    require(d.label is None or (bool(d.label) and not d.label.endswith(":")), "data.label",
            f"must be a member key (cls) or json:FIELD, got {d.label!r}")

    require(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    for name in ("lr_g", "lr_d"):
        v = getattr(t, name)
        require(v > 0 and v == v, f"train.{name}", f"must be > 0, got {v}")
    require(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    require(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    require(t.ndis >= 1, "train.ndis", f"must be >= 1, got {t.ndis}")
    require(0 <= t.lr_decay <= 1, "train.lr_decay", f"must be in [0, 1], got {t.lr_decay}")
    for policy in t.diffaugment:
        require(policy in DIFFAUGMENT_POLICIES, "train.diffaugment",
                f"unknown policy {policy!r}; choose from {list(DIFFAUGMENT_POLICIES)}")
    require(t.loss in ("hinge", "ns"), "train.loss", f"must be 'hinge' or 'ns', got {t.loss!r}")
    require(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    require(t.ema_start >= 0, "train.ema_start", "must be >= 0")
    require(t.ema_standing_samples >= 0, "train.ema_standing_samples", "must be >= 0 (0 = off)")
    require(t.amp in AMP_MODES, "train.amp",
             f"must be one of {', '.join(AMP_MODES)}, got {t.amp!r}")
    for name in ("log_every", "ckpt_every", "sample_every"):
        require(getattr(t, name) >= 0, f"train.{name}", "must be >= 0 (0 disables)")
    require(t.nan_policy in ("stop", "skip"), "train.nan_policy",
             f"must be 'stop' or 'skip', got {t.nan_policy!r}")

    require(e.eval_every >= 0, "eval.eval_every", "must be >= 0 (0 disables)")
    require(e.num_samples > 1, "eval.num_samples", "must be > 1")
    require(e.real_samples > 1, "eval.real_samples", "must be > 1")
    require(e.batch_size > 0, "eval.batch_size", "must be > 0")
    from sagan.eval.names import METRICS, choices  # the one metric registry (no torch)

    for i, metric in enumerate(e.metrics):
        require(metric in METRICS, f"eval.metrics[{i}]",
                 f"must be one of {choices()}; got {metric!r}")
    require(e.runtime in EVAL_RUNTIMES, "eval.runtime",
            f"must be one of {', '.join(EVAL_RUNTIMES)}; got {e.runtime!r}")
    require("ifid" not in e.metrics or m.num_classes > 0, "eval.metrics",
            "'ifid' (intra-class FID) needs a conditional model (model.num_classes > 0)")
