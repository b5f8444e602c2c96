"""The config the pipelines run with: the library's sections plus `cluster` and `tracking`.

    cfg = load_run_config("configs/quickstart.yaml", ["cluster.workers=2", "train.steps=50"])

`sagan.config.Config` describes the model, data, training step and evaluation; how a run is
placed on Ray (workers, resources, failures, checkpoint storage, run name) and where it is
tracked (MLflow) belongs here. The library's loader skips these two sections; this one validates
every section with the same one-line errors. The fields that used to live in `train`
(`train.workers`, `train.storage_path`, ...) are still read there (`Config.MOVED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sagan.config import Config, config_from_dict, load_config, require


@dataclass
class ClusterConfig:
    """Ray Train: ScalingConfig, FailureConfig, RunConfig(name, storage_path), CheckpointConfig."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0: CPU workers with gloo
    max_failures: int = 3  # worker-group restarts after worker errors; -1: unlimited
    storage_path: str = "runs"  # local directory or s3://bucket/prefix
    run_name: str = "sagan"  # same name (and storage) = continue the run
    keep_checkpoints: int = 3
    # Ray Train's own console log level (RunConfig.logging_config) for its `ray.train` loggers:
    # ERROR also hides its harmless "Failed to send resource request ... GetTimeoutError"
    # warnings on busy machines, and its INFO lines (worker-group starts, retry decisions).
    ray_log_level: str = "INFO"


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else ./mlruns
    experiment: str = "sagan"
    registered_model: str = "sagan-generator"
    # seconds between samples of MLflow's system-metrics monitor (one per node); 0: off
    system_metrics_every: float = 10.0


@dataclass
class PipelineConfig(Config):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    RUNNER_SECTIONS: ClassVar[tuple[str, ...]] = ()  # this schema validates them all

    def validate(self) -> None:
        super().validate()
        c, t = self.cluster, self.train
        require(c.workers >= 1, "cluster.workers", f"must be >= 1, got {c.workers}")
        require(t.batch_size % c.workers == 0, "train.batch_size",
                f"{t.batch_size} is not divisible by cluster.workers={c.workers}")
        require(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
        require(c.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")
        require(c.max_failures >= -1, "cluster.max_failures", "must be >= -1 (-1: unlimited)")
        require(bool(c.storage_path), "cluster.storage_path", "must not be empty")
        require(bool(c.run_name) and "/" not in c.run_name, "cluster.run_name",
                "must be a non-empty name without '/'")
        require(c.keep_checkpoints >= 1, "cluster.keep_checkpoints", "must be >= 1")
        require(c.ray_log_level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                "cluster.ray_log_level",
                f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {c.ray_log_level!r}")
        require(self.tracking.system_metrics_every >= 0, "tracking.system_metrics_every",
                "must be >= 0 seconds (0: off)")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None
                    ) -> PipelineConfig:
    """Load YAML `path` (None: all defaults) with dotted overrides; every section validated."""
    return load_config(path, overrides, schema=PipelineConfig)


def run_config_from_dict(data: dict, overrides: list[str] | None = None) -> PipelineConfig:
    """A PipelineConfig from a plain dict (a config shipped to a worker, a logged YAML)."""
    return config_from_dict(data, overrides, schema=PipelineConfig)
