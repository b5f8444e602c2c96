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

PLACEMENTS = ("pack", "spread", "strict_spread")


@dataclass
class ClusterConfig:
    """Ray Train: ScalingConfig, FailureConfig, RunConfig(name, storage_path), CheckpointConfig.

    `workers: [min, max]` is Ray Train V2's elastic scaling: the run starts with as many
    workers as the cluster can place (at most max), restarts on fewer (at least min) from the
    last checkpoint when a node is lost, and grows back when capacity returns (checked every
    `resize_interval_s`). train.batch_size is the global batch at every size (docs/INFRA.md)."""

    workers: int | list[int] = 1  # N, or [min, max] for elastic training
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0: CPU workers with gloo
    placement: str = "pack"  # pack | spread | strict_spread (one worker per node)
    resize_interval_s: float = 60.0  # elastic: how often a running group checks for capacity
    max_failures: int = 3  # worker-group restarts after worker errors; -1: unlimited
    storage_path: str = "runs"  # local directory or s3://bucket/prefix
    shared_storage: bool = False  # a local storage_path that every node mounts (NFS, ...)
    run_name: str = "sagan"  # same name (and storage) = continue the run
    keep_checkpoints: int = 3
    # how long rank 0 waits for s3:// checkpoint storage that does not answer before uploading
    # a checkpoint (training pauses meanwhile, one line a minute; ray_cluster.wait_for_storage)
    storage_wait_s: float = 600.0
    # Ray Train's own console log level (RunConfig.logging_config) for its `ray.train` loggers:
    # ERROR also hides its harmless "Failed to send resource request ... GetTimeoutError"
    # warnings on busy machines, and its INFO lines (worker-group starts, retry decisions).
    ray_log_level: str = "INFO"

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[-1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.workers, int)

    def num_workers(self) -> int | tuple[int, int]:
        """ScalingConfig(num_workers=...): an int, or (min, max) for elastic scaling."""
        return (self.min_workers, self.max_workers) if self.elastic else self.min_workers


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else ./mlruns
    experiment: str = "sagan"
    registered_model: str = "sagan-generator"
    # seconds between samples of MLflow's system-metrics monitor (one per node); 0: off
    system_metrics_every: float = 10.0
    # Tracking is a side channel (pipelines/tracking_queue.py): the step loop never waits on
    # MLflow. How long the end of a run (rank 0's queued metrics, registering the model) waits
    # for an unreachable server before it ends with the checkpoint saved and a command to
    # register it later; images queued while the server is down, beyond which the oldest are
    # dropped (counted in `dropped_images`); where unsent metrics are kept meanwhile ("": the
    # system temp dir, on the node of rank 0).
    wait_s: float = 600.0
    max_queued_images: int = 64
    spill_dir: str = ""


@dataclass
class PipelineConfig(Config):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    RUNNER_SECTIONS: ClassVar[tuple[str, ...]] = ()  # this schema validates them all

    def validate(self) -> None:
        super().validate()
        c, t = self.cluster, self.train
        if c.elastic:
            require(len(c.workers) == 2, "cluster.workers",
                    f"must be N or [min, max], got {c.workers}")
        require(1 <= c.min_workers <= c.max_workers, "cluster.workers",
                f"must be >= 1 (and min <= max), got {c.workers}")
        # the global batch stays train.batch_size at every world size the run may have
        sizes = range(c.min_workers, c.max_workers + 1)
        bad = [w for w in sizes if t.batch_size % w]
        require(not bad, "train.batch_size",
                f"{t.batch_size} is not divisible by cluster.workers={c.workers}" if not c.elastic
                else f"{t.batch_size} is not divisible by every world size in cluster.workers="
                     f"{c.workers} (not by {bad[0] if bad else 0}); pick a multiple of each")
        require(c.placement in PLACEMENTS, "cluster.placement",
                f"must be one of {', '.join(PLACEMENTS)}, got {c.placement!r}")
        require(c.resize_interval_s >= 0, "cluster.resize_interval_s", "must be >= 0")
        require(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
        require(c.gpus_per_worker >= 0, "cluster.gpus_per_worker", "must be >= 0")
        require(c.max_failures >= -1, "cluster.max_failures", "must be >= -1 (-1: unlimited)")
        require(bool(c.storage_path), "cluster.storage_path", "must not be empty")
        require(bool(c.run_name) and "/" not in c.run_name, "cluster.run_name",
                "must be a non-empty name without '/'")
        require(c.keep_checkpoints >= 1, "cluster.keep_checkpoints", "must be >= 1")
        require(c.storage_wait_s >= 0, "cluster.storage_wait_s", "must be >= 0 seconds")
        require(c.ray_log_level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                "cluster.ray_log_level",
                f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {c.ray_log_level!r}")
        require(self.tracking.system_metrics_every >= 0, "tracking.system_metrics_every",
                "must be >= 0 seconds (0: off)")
        require(self.tracking.wait_s >= 0, "tracking.wait_s", "must be >= 0 seconds")
        require(self.tracking.max_queued_images >= 0, "tracking.max_queued_images",
                "must be >= 0")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None
                    ) -> PipelineConfig:
    """Load YAML `path` (None: all defaults) with dotted overrides; every section validated."""
    return load_config(path, overrides, schema=PipelineConfig)


def run_config_from_dict(data: dict, overrides: list[str] | None = None) -> PipelineConfig:
    """A PipelineConfig from a plain dict (a config shipped to a worker, a logged YAML)."""
    return config_from_dict(data, overrides, schema=PipelineConfig)
