"""Train SAGAN data-parallel on Ray Train, tracked in MLflow.

    python pipelines/train.py                                   # embedded default (quickstart)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/train.py --config configs/sagan128.yaml --workers 8 --gpus-per-worker 1

Positional KEY=VALUE arguments override any config field (`train.steps=2000`). The steps are in
pipelines/driver.py; this script parses, calls `run_training`, and turns errors into one line
and an exit code (2: bad input or a check that failed first; 3: training stopped).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.config import PipelineConfig, load_run_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
# command-line flag -> config field
FLAGS = {"workers": "cluster.workers", "gpus_per_worker": "cluster.gpus_per_worker",
         "cpus_per_worker": "cluster.cpus_per_worker", "run_name": "cluster.run_name",
         "storage_path": "cluster.storage_path", "tracking_uri": "tracking.tracking_uri"}


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
    p.add_argument("--workers", type=int, help="number of Ray Train workers (cluster.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0 = CPU + gloo")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker")
    p.add_argument("--run-name", help="run name (cluster.run_name): same name = continue the run")
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


def build_config(args: argparse.Namespace) -> PipelineConfig:
    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items()
             if getattr(args, flag) is not None]
    return load_run_config(args.config, [*args.overrides, *flags])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.driver import TrainingStopped, run_training
    from pipelines.preflight import PreflightError
    from pipelines.tracking import TrackingError, resolve_tracking_uri
    from sagan.config import ConfigError

    try:
        cfg = build_config(args)
        uri = resolve_tracking_uri(cfg, project_dir=Path.cwd())
        outcome = run_training(cfg, uri, register_model=not args.no_register,
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
