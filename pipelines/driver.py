"""The training driver, step by step: preflight, cluster, MLflow run, TorchTrainer, registration.

    outcome = run_training(cfg, tracking_uri)        # what `python pipelines/train.py` does

`run_training` is the steps below in order; a Tune trial with several workers runs the same
function inside the trial. Everything that can fail before the cluster does work fails first
(`PreflightError`, `TrackingError`: one line, exit code 2); a run that ends without a usable
result raises `TrainingStopped` (one line; exit code 2 or 3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from sagan.config import to_dict

# Endpoint and region variables the workers need to reach the same S3 (never credentials: those
# come from each node's own boto3 chain), and MLflow's HTTP retry budget, so the workers' calls
# to the tracking server retry as the driver's do.
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT")


class TrainingStopped(RuntimeError):
    """Training ended without a usable result: a non-finite loss with train.nan_policy=stop
    (names the step and the last good checkpoint), or a final checkpoint that does not load
    (exit code 3); or the workers met an error every retry would meet again, such as data or a
    checkpoint that does not fit the model (exit code 2). One line."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainOutcome:
    run_id: str
    step: int
    metrics: dict
    checkpoint_path: str | None
    model_version: str | None


def prepare(cfg: PipelineConfig, tracking_uri: str | None
            ) -> tuple[PipelineConfig, str | None, list[tuple[str, str]]]:
    """Preflight without the cluster: MLflow answers, local paths made absolute, the data
    exists (prepared on first use) and fits the model. Returns (cfg, tracking_uri, the fields
    that were relative paths)."""
    from pipelines.preflight import absolute_tracking_uri, ensure_data, localize_paths
    from pipelines.tracking import check_reachable

    if tracking_uri:
        tracking_uri = absolute_tracking_uri(tracking_uri)
        check_reachable(tracking_uri)
    cfg, relative = localize_paths(cfg)
    ensure_data(cfg)
    return cfg, tracking_uri, relative


def join_cluster(cfg: PipelineConfig, relative: list[tuple[str, str]],
                 allow_autoscale: bool) -> None:
    """Connect to the Ray cluster (pipelines/ray_cluster.py) and check that it can run this
    config: no relative paths and no node-local checkpoint storage on several nodes, room for
    the workers."""
    from pipelines.preflight import (
        check_resources,
        refuse_local_storage_on_many_nodes,
        refuse_relative_on_many_nodes,
    )
    from pipelines.ray_cluster import alive_nodes, connect

    print(f"training on {connect()}", flush=True)
    nodes = alive_nodes()
    refuse_relative_on_many_nodes(relative, nodes)
    refuse_local_storage_on_many_nodes(cfg, nodes)
    check_resources(cfg, allow_autoscale)


def fit(cfg: PipelineConfig, tracking_uri: str | None, run_id: str | None,
        callbacks: list | None = None) -> Any:
    """Run the TorchTrainer on the connected cluster to its end and return Ray's Result;
    raises TrainingStopped (one line, marking the MLflow run FAILED) when the workers stopped
    for good. `cfg`'s local paths must already be absolute (`prepare`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_cluster import CapacityWatch, storage_location
    from pipelines.tracking import mark_stopped
    from pipelines.train_loop import EXIT_KEY, STOPPED_KEY, train_loop_per_worker

    c = cfg.cluster
    path, filesystem = storage_location(c.storage_path)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking_uri": tracking_uri,
                           "run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers(), use_gpu=c.gpus_per_worker > 0,
            resources_per_worker={"CPU": c.cpus_per_worker,
                                  **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})},
            placement_strategy=c.placement.upper(),
            elastic_resize_monitor_interval_s=c.resize_interval_s),
        run_config=RunConfig(
            name=c.run_name, storage_path=path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=callbacks, logging_config=LoggingConfig(log_level=c.ray_log_level)),
    )
    with CapacityWatch(c):
        result = trainer.fit()
    stopped = result.return_value if isinstance(result.return_value, dict) else {}
    if stopped.get(STOPPED_KEY):
        message = str(stopped[STOPPED_KEY])
        if tracking_uri and run_id:
            mark_stopped(tracking_uri, run_id, message)
        code = int(stopped.get(EXIT_KEY, 3))
        if code == 3:
            step = (result.metrics or {}).get("step")
            last = f"{result.checkpoint.path} (step {step})" if result.checkpoint else "none yet"
            message = f"{message}; last good checkpoint: {last}"
        raise TrainingStopped(message, code)
    return result


def register(cfg: PipelineConfig, result: Any, tracking_uri: str, run_id: str,
             datasets: dict[str, Any] | None = None) -> tuple[int, str]:
    """Log the final checkpoint's EMA generator as an MLflow model, register and describe it
    (pipelines/registry.py); returns (its step, the model version)."""
    from pipelines.train_loop import CHECKPOINT_FILE
    from sagan.checkpoint import CheckpointError, load_checkpoint

    try:
        with result.checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    except CheckpointError as exc:  # e.g. its upload failed without an error (RELIABILITY.md)
        raise TrainingStopped(
            f"the final checkpoint {result.checkpoint.path} is unusable ({exc}); re-run the "
            "same command to redo the steps since the last good checkpoint") from None
    return register_state(cfg, state, result.metrics or {}, tracking_uri, run_id, datasets)


def register_state(cfg: PipelineConfig, state: dict, metrics: dict, tracking_uri: str,
                   run_id: str, datasets: dict[str, Any] | None = None) -> tuple[int, str]:
    """Register a loaded checkpoint's EMA generator (also `pipelines/register.py`, which
    registers a checkpoint from storage after MLflow was down at the end of a run)."""
    from pipelines.registry import describe_version, log_generator
    from sagan.checkpoint import ema_weights

    step, fid = int(state["step"]), metrics.get("fid")
    name = cfg.tracking.registered_model
    version = log_generator(tracking_uri, run_id, ema_weights(state), cfg.model, name,
                            fid=float(fid) if fid is not None else None, step=step)
    describe_version(tracking_uri, name, version, cfg, step, metrics, datasets)
    print(f"registered models:/{name}/{version} (now models:/{name}@latest) from step {step}",
          flush=True)
    return step, version


def checkpoint_uri(cfg: PipelineConfig, result: Any) -> str:
    """Where the final checkpoint lies, as `pipelines/register.py` takes it (Ray gives an
    s3:// path without its scheme when the run's storage has its own filesystem)."""
    path = result.checkpoint.path
    if cfg.cluster.storage_path.startswith("s3://") and not path.startswith("s3://"):
        return "s3://" + path
    return path


def _server_back(cfg: PipelineConfig, result: Any, tracking_uri: str, run_id: str) -> None:
    """Wait (at most tracking.wait_s) for MLflow before the end-of-run calls; when it stays
    down, stop with the checkpoint saved and the command that registers it later."""
    from pipelines.tracking_queue import wait_for_server

    wait_s = cfg.tracking.wait_s
    if wait_for_server(tracking_uri, wait_s, "register the model and end the run",
                       say=lambda line: print(line, flush=True)):
        return
    where = checkpoint_uri(cfg, result) if result.checkpoint is not None else None
    later = (f"; the checkpoint is saved at {where}; register it later with: python "
             f"pipelines/register.py {where} --tracking-uri {tracking_uri}") if where else ""
    raise TrainingStopped(f"MLflow at {tracking_uri} unreachable for {wait_s:.0f} s "
                          f"(tracking.wait_s) at the end of run {run_id}{later}", 3)


def run_training(cfg: PipelineConfig, tracking_uri: str | None, register_model: bool = True,
                 allow_autoscale: bool = False, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None, callbacks: list | None = None,
                 ) -> TrainOutcome:
    """All the steps: prepare, join the cluster, find or start the MLflow run, fit, register
    the final EMA generator, mark the run finished."""
    from pipelines.lineage import record_lineage
    from pipelines.tracking import find_or_create_run, mark_finished

    cfg, tracking_uri, relative = prepare(cfg, tracking_uri)
    join_cluster(cfg, relative, allow_autoscale)
    run_id, datasets = None, None
    if tracking_uri:
        run_id, resumed = find_or_create_run(cfg, tracking_uri, parent_run_id, extra_tags)
        datasets = record_lineage(cfg, tracking_uri, run_id)
        print(f"MLflow run {run_id} ({'continuing' if resumed else 'new'}) at {tracking_uri}",
              flush=True)
    result = fit(cfg, tracking_uri, run_id, callbacks)
    if tracking_uri and run_id:
        _server_back(cfg, result, tracking_uri, run_id)
    metrics = dict(result.metrics or {})
    step, version = int(metrics.get("step", 0)), None
    if register_model and tracking_uri and run_id and result.checkpoint is not None:
        step, version = register(cfg, result, tracking_uri, run_id, datasets)
    if tracking_uri and run_id and step >= cfg.train.steps:
        mark_finished(tracking_uri, run_id)
    return TrainOutcome(run_id or "", step, metrics,
                        result.checkpoint.path if result.checkpoint else None, version)
