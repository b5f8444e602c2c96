"""Register a training checkpoint from storage as the MLflow model a finished run registers.

    python pipelines/register.py s3://bucket/runs/sagan/checkpoint_2026-... [--tracking-uri URI]
    python pipelines/register.py runs/sagan/checkpoint_2026-.../checkpoint.pt

Why: tracking is a side channel, so a run whose MLflow server is still down at the end
(longer than `tracking.wait_s`) ends with its checkpoint saved and prints this command. It
reads the checkpoint (its config included), finds the run by `cluster.run_name` as training
does, registers the EMA generator with the run's last scores, and marks the run FINISHED when
the checkpoint reached `train.steps`. Exit 2 with one `error:` line for a checkpoint that is
missing or does not load, or a server that does not answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_state(where: str) -> dict:
    """The checkpoint dict from a checkpoint directory or file, local or s3:// (the same
    endpoint and credentials the training used, from the environment)."""
    from pipelines.ray_cluster import storage_location
    from pipelines.train_loop import CHECKPOINT_FILE
    from sagan.checkpoint import load_checkpoint

    if not where.startswith("s3://"):
        path = Path(where)
        return load_checkpoint(path if path.is_file() else path / CHECKPOINT_FILE)
    from ray.train import Checkpoint

    where = where.rstrip("/").removesuffix("/" + CHECKPOINT_FILE)
    path, filesystem = storage_location(where)
    with Checkpoint(path=path, filesystem=filesystem).as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Register a checkpoint's EMA generator in MLflow "
                                "(after a run whose tracking server was down at the end).")
    p.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt, local or s3://")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the checkpoint's "
                   "config, else $MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from pipelines.config import run_config_from_dict
    from pipelines.driver import register_state
    from pipelines.tracking import (
        TrackingError,
        check_reachable,
        find_or_create_run,
        mark_finished,
        resolve_tracking_uri,
    )
    from sagan.checkpoint import CheckpointError
    from sagan.config import ConfigError

    try:
        state = load_state(args.checkpoint)
        cfg = run_config_from_dict(state["config"])
        uri = args.tracking_uri or resolve_tracking_uri(cfg)
        check_reachable(uri)
    except (CheckpointError, ConfigError, TrackingError, OSError) as exc:
        where = "" if isinstance(exc, CheckpointError) else f"checkpoint '{args.checkpoint}': "
        print(f"error: {where}{exc}".splitlines()[0], file=sys.stderr)
        return 2
    run_id, _ = find_or_create_run(cfg, uri)
    metrics = dict(MlflowClient(uri).get_run(run_id).data.metrics)
    step, version = register_state(cfg, state, metrics, uri, run_id)
    if step >= cfg.train.steps:
        mark_finished(uri, run_id)
    print(f"done: run {run_id} at {uri}, models:/{cfg.tracking.registered_model}/{version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
