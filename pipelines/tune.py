"""Sweep SAGAN hyper-parameters on Ray Tune, with ASHA on FID and MLflow tracking.

    python pipelines/tune.py --config configs/sweep_placement.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/tune.py --config configs/sweep_placement.yaml

The sweep file and the trials: pipelines/sweep.py. This script parses, calls `run_sweep`, and
turns errors into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sweep SAGAN hyper-parameters with Ray Tune "
                                "(ASHA on FID), tracked in MLflow.")
    p.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_placement.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides applied to the base training config of every trial")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                   "else ./mlruns sqlite store)")
    p.add_argument("--storage-path", help="where Tune keeps the sweep's state and checkpoints "
                   "(tune.storage_path; a sweep found there is resumed)")
    p.add_argument("--report-dir", help="also write the summary CSV, the metric-vs-step plot "
                   "and each trial's final sample grid here (tune.report_dir)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.preflight import PreflightError
    from pipelines.sweep import SweepError, load_sweep, run_sweep
    from pipelines.tracking import TrackingError, resolve_tracking_uri
    from sagan.config import ConfigError

    try:
        overrides = list(args.overrides)
        if args.tracking_uri:
            overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
        spec = load_sweep(args.config, overrides)
        if args.storage_path:
            spec.storage_path = args.storage_path
        if args.report_dir:
            spec.report_dir = args.report_dir
        uri = resolve_tracking_uri(spec.base, project_dir=Path.cwd())
        summary = run_sweep(spec, uri)
    except (SweepError, ConfigError, TrackingError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep {spec.name}: {len(summary['trials'])} trials; best {summary['best_trial']} "
          f"{spec.metric}={summary['best_value']}; registered "
          f"models:/{spec.base.tracking.registered_model}@sweep-best "
          f"(version {summary['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
