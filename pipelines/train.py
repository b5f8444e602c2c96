"""Train SAGAN data-parallel on Ray Train, tracked in MLflow.

    python pipelines/train.py                                   # embedded default (quickstart)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/train.py --config configs/sagan128.yaml --workers 8 --gpus-per-worker 1

Positional KEY=VALUE arguments override any config field (`train.steps=2000`). Everything that
can be checked before the cluster does work is checked first: config, MLflow reachability, the
shard prefix, and whether the cluster can place the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script by `ray job submit`
    sys.path.insert(0, str(ROOT))

from sagan.config import Config, ConfigError, load_config, to_dict  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train SAGAN on Ray Train (data-parallel), tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python pipelines/train.py\n"
               "  python pipelines/train.py --config configs/sagan32.yaml train.steps=5000\n"
               "  ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
               "python pipelines/train.py --workers 2")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML preset (default: configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.lr_d=2e-4 model.g_attention=[16]")
    p.add_argument("--workers", type=int, help="number of Ray Train workers (train.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0 = CPU + gloo")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker")
    p.add_argument("--run-name", help="run name (train.run_name): same name = continue the run")
    p.add_argument("--storage-path", help="checkpoint storage: local dir or s3://bucket/prefix")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                   "else a sqlite store in ./mlruns)")
    p.add_argument("--allow-autoscale", action="store_true",
                   default=os.environ.get("SAGAN_ALLOW_AUTOSCALE") == "1",
                   help="skip the 'cluster can place the workers now' check (autoscaling "
                        "clusters add nodes on demand); env SAGAN_ALLOW_AUTOSCALE=1")
    p.add_argument("--no-register", action="store_true",
                   help="do not log/register the final EMA generator in MLflow")
    return p.parse_intermixed_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("workers", "train.workers"), ("gpus_per_worker", "train.gpus_per_worker"),
                      ("cpus_per_worker", "train.cpus_per_worker"),
                      ("run_name", "train.run_name"), ("storage_path", "train.storage_path"),
                      ("tracking_uri", "tracking.tracking_uri")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


# --------------------------------------------------------------------------- driver


def fit(cfg: Config, tracking_uri: str | None, run_id: str | None,
        callbacks: list | None = None) -> Any:
    """Run the TorchTrainer on the connected cluster to its end and return Ray's Result;
    raises TrainingStopped (one line, marking the MLflow run FAILED) when the workers stopped
    for good. `cfg`'s local paths must already be absolute (`preflight.localize_paths`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_cluster import storage_location
    from pipelines.train_loop import EXIT_KEY, STOPPED_KEY, train_loop_per_worker

    t = cfg.train
    path, filesystem = storage_location(t.storage_path)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking_uri": tracking_uri,
                           "run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
            resources_per_worker={"CPU": t.cpus_per_worker,
                                  **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {})}),
        run_config=RunConfig(
            name=t.run_name, storage_path=path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=callbacks),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    stopped = result.return_value if isinstance(result.return_value, dict) else {}
    if stopped.get(STOPPED_KEY):
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            client.set_tag(run_id, "sagan.stopped", str(stopped[STOPPED_KEY])[:5000])
            client.set_terminated(run_id, "FAILED")
        code = int(stopped.get(EXIT_KEY, 3))
        if code != 3:
            raise TrainingStopped(str(stopped[STOPPED_KEY]), code)
        last = (f"{result.checkpoint.path} (step {metrics.get('step')})" if result.checkpoint
                else "none yet")
        raise TrainingStopped(f"{stopped[STOPPED_KEY]}; last good checkpoint: {last}")
    return result


def run_training(cfg: Config, tracking_uri: str | None, register: bool = True,
                 allow_autoscale: bool = False, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None, callbacks: list | None = None,
                 ) -> TrainOutcome:
    """Preflight, launch the TorchTrainer, then log/register the final EMA generator."""
    from pipelines.preflight import (
        absolute_tracking_uri,
        check_resources,
        ensure_data,
        localize_paths,
        refuse_relative_on_many_nodes,
    )
    from pipelines.ray_cluster import alive_nodes, connect
    from pipelines.tracking import check_reachable, find_or_create_run, log_generator
    from pipelines.train_loop import CHECKPOINT_FILE

    if tracking_uri:
        tracking_uri = absolute_tracking_uri(tracking_uri)
        check_reachable(tracking_uri)
    cfg, relative = localize_paths(cfg)
    ensure_data(cfg)
    print(f"training on {connect()}", flush=True)
    refuse_relative_on_many_nodes(relative, alive_nodes())
    check_resources(cfg, allow_autoscale)
    run_id = None
    if tracking_uri:
        run_id, resumed = find_or_create_run(cfg, tracking_uri, parent_run_id, extra_tags)
        print(f"MLflow run {run_id} ({'continuing' if resumed else 'new'}) at {tracking_uri}",
              flush=True)

    result = fit(cfg, tracking_uri, run_id, callbacks)
    metrics = dict(result.metrics or {})
    step = int(metrics.get("step", 0))
    version = None
    ckpt_path = result.checkpoint.path if result.checkpoint else None
    if register and tracking_uri and run_id and result.checkpoint is not None:
        from sagan.checkpoint import CheckpointError, ema_weights, load_checkpoint

        try:
            with result.checkpoint.as_directory() as d:
                state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        except CheckpointError as exc:  # e.g. its upload failed without an error (RELIABILITY.md)
            raise TrainingStopped(
                f"the final checkpoint {result.checkpoint.path} is unusable ({exc}); re-run the "
                "same command to redo the steps since the last good checkpoint") from None
        ema = ema_weights(state)
        step = int(state["step"])
        fid = metrics.get("fid")
        version = log_generator(tracking_uri, run_id, ema, cfg.model,
                                cfg.tracking.registered_model,
                                fid=float(fid) if fid is not None else None, step=step)
        print(f"registered models:/{cfg.tracking.registered_model}/{version} "
              f"(now models:/{cfg.tracking.registered_model}@latest) from step {step}", flush=True)
    if tracking_uri and run_id and step >= cfg.train.steps:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED")
    return TrainOutcome(run_id or "", step, metrics, ckpt_path, version)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.preflight import PreflightError
    from pipelines.tracking import TrackingError, resolve_tracking_uri

    try:
        cfg = build_config(args)
        uri = resolve_tracking_uri(cfg, project_dir=Path.cwd())
        outcome = run_training(cfg, uri, register=not args.no_register,
                               allow_autoscale=args.allow_autoscale)
    except (ConfigError, PreflightError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"done: step {outcome.step}/{cfg.train.steps}; MLflow run {outcome.run_id} at {uri}")
    if outcome.model_version:
        print(f"model: models:/{cfg.tracking.registered_model}@latest "
              f"(version {outcome.model_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
