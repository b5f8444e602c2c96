"""Evaluate a SAGAN generator (checkpoint or MLflow model): FID, KID, IS, precision/recall,
density/coverage, intra-class FID, each printed and logged with the protocol it was measured
under (weights, real set and digest, counts, resize, library versions).

    python pipelines/evaluate.py --model runs/sagan/checkpoint_000004/checkpoint.pt \\
        --data data/fashion-mnist-32
    python pipelines/evaluate.py --model models:/sagan-generator@champion \\
        --data s3://datasets/cifar10-32 --num-samples 10000 --out metrics.json
    python pipelines/evaluate.py --model ckpt.pt --data data/x --inception-weights \\
        /shared/weights-inception-2015-12-05-6726825d.pth          # offline cluster
    python pipelines/evaluate.py --model ckpt.pt --data data/test --metrics fid,kid,prc,dc,ifid \\
        --truncation 1.0

Prints one `name value` line per metric, writes JSON (--out), and logs a run to MLflow when
--tracking-uri or $MLFLOW_TRACKING_URI is set. Bad input ends with one line on stderr naming the
file or field, exit code 2. See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig, load_run_config, run_config_from_dict
from sagan.config import ConfigError, to_dict
from sagan.eval.names import IFID_CLASS_PREFIX, METRICS, choices
from sagan.truncation import check_truncation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Score a SAGAN generator against a real image set (metrics: "
                    f"{choices()}; standard Inception features, real-set features cached "
                    "under eval.cache_dir); prints each score and the protocol behind it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python pipelines/evaluate.py --model runs/sagan/ckpt/checkpoint.pt "
               "--data data/fashion-mnist-32\n"
               "  python pipelines/evaluate.py --model models:/sagan-generator@champion "
               "--data s3://bucket/cifar10-32 --out metrics.json\n"
               "offline: --inception-weights PATH or put the weights file in "
               "$TORCH_HOME/hub/checkpoints/ (see docs/EVALUATION.md)")
    p.add_argument("--model", required=True, metavar="SRC",
                   help="checkpoint file/dir, or MLflow URI models:/NAME@ALIAS, runs:/ID/generator")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="real set: shard dir, s3://bucket/prefix or http(s):// prefix")
    p.add_argument("--config", metavar="YAML",
                   help="config whose eval section to use (default: the checkpoint's, else "
                        "defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. eval.batch_size=128")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="generated images (eval.num_samples)")
    p.add_argument("--real-samples", type=int, metavar="N", help="real images (eval.real_samples)")
    p.add_argument("--metrics", metavar="LIST",
                   help=f"comma list of {choices().replace(', ', ',')} (eval.metrics): "
                        + "; ".join(f"{m.name}: {m.paper}" for m in METRICS.values()))
    p.add_argument("--truncation", type=float, metavar="T",
                   help="truncation trick: redraw every |z| entry > T (BigGAN; default: none)")
    p.add_argument("--batch-size", type=int, metavar="N", help="eval.batch_size")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="InceptionV3 weights file for offline use (eval.inception_weights)")
    p.add_argument("--cache-dir", metavar="DIR", help="real-feature cache (eval.cache_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// data (default: AWS_ENDPOINT_URL*)")
    p.add_argument("--out", metavar="JSON", help="write the metrics (and what was evaluated) here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI: log an evaluation run there "
                   "(default: $MLFLOW_TRACKING_URI; unset = no logging)")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, ckpt_cfg: Any) -> PipelineConfig:
    """--config YAML, else the checkpoint's config, else defaults; then overrides and flags."""
    if args.config:
        cfg = load_run_config(args.config, args.overrides)
    elif ckpt_cfg is not None:
        cfg = run_config_from_dict(to_dict(ckpt_cfg), args.overrides)
    else:
        cfg = load_run_config(None, args.overrides)
    ev: dict[str, Any] = {}
    for flag, name in (("num_samples", "num_samples"), ("real_samples", "real_samples"),
                       ("batch_size", "batch_size"), ("inception_weights", "inception_weights"),
                       ("cache_dir", "cache_dir")):
        if getattr(args, flag) is not None:
            ev[name] = getattr(args, flag)
    if args.metrics is not None:
        ev["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    cfg.eval = dataclasses.replace(cfg.eval, **ev)
    cfg.validate()
    if not cfg.eval.metrics:
        raise ConfigError(f"config field 'eval.metrics': empty; choose from {choices()}")
    try:
        check_truncation(args.truncation, "--truncation")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def _tracking_uri(args: argparse.Namespace) -> str | None:
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def per_class_table(metrics: dict[str, float]) -> dict[str, list]:
    """The `ifid/<class>` scores as a two-column table (MLflow table artifact, JSON)."""
    rows = sorted((int(k[len(IFID_CLASS_PREFIX):]), v) for k, v in metrics.items()
                  if k.startswith(IFID_CLASS_PREFIX))
    return {"class": [c for c, _ in rows], "ifid": [v for _, v in rows]}


def log_to_mlflow(uri: str, experiment: str, record: dict[str, Any], out: str | None) -> str:
    """One MLflow run per evaluation: params (what was evaluated, the protocol), metrics, the
    JSON record and, for ifid, the per-class table. When the model is a registered version
    (`models:/NAME/V`, `models:/NAME@ALIAS`), its tags get the scores and the protocol too."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    mlflow.set_experiment(experiment_id=experiment_id(client, experiment, uri))
    name = f"evaluate-{Path(str(record['model'])).name or 'model'}"[:100]
    with mlflow.start_run(run_name=name, tags={"sagan.kind": "evaluation",
                                               "sagan.model_source": str(record["model"])}) as run:
        mlflow.log_params({k: str(record[k])[:500] for k in
                           ("model", "data", "num_samples", "real_samples", "seed", "device",
                            "inception_weights", "truncation")})
        mlflow.log_params(record["protocol"])
        mlflow.log_metrics({k.replace("/", "."): v for k, v in record["metrics"].items()})
        table = per_class_table(record["metrics"])
        if table["class"]:
            mlflow.log_table(table, "ifid_per_class.json")
        if out:
            mlflow.log_artifact(out)
        else:
            mlflow.log_dict(record, "metrics.json")
        version = _registered_version(client, str(record["model"]))
        if version is not None:
            tags = {**{f"eval.{k}": f"{v:.6g}" for k, v in record["metrics"].items()
                       if not k.startswith(IFID_CLASS_PREFIX)},
                    **{f"eval.{k}": v for k, v in record["protocol"].items()},
                    "eval.run_id": run.info.run_id}
            for key, value in tags.items():
                client.set_model_version_tag(version[0], version[1], key, value)
        return run.info.run_id


def _registered_version(client: Any, source: str) -> tuple[str, str] | None:
    """(name, version) of a `models:/NAME/V` or `models:/NAME@ALIAS` source, else None."""
    if not source.startswith("models:/"):
        return None
    ref = source[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias).version
    name, _, version = ref.rpartition("/")
    return (name, version) if name and version.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pipelines.model_io import ModelSourceError, load_generator_any, resolve_device
    from sagan.checkpoint import CheckpointError
    from sagan.data import DataError
    from sagan.eval import (
        InceptionWeightsError,
        RealDataError,
        evaluate_generator,
        resolve_inception_weights,
    )

    known = (ConfigError, ModelSourceError, CheckpointError, DataError, InceptionWeightsError,
             RealDataError, FileNotFoundError)
    progress = not args.no_progress
    uri = _tracking_uri(args)
    try:
        from pipelines.tracking import TrackingError, check_reachable

        known = (*known, TrackingError)
        device = resolve_device(args.device)
        if uri:
            check_reachable(uri)  # fail before minutes of sampling, not after
        steps = tqdm(total=3, desc="evaluate", unit="step", disable=not progress)
        steps.set_postfix_str("loading model")
        G, _model_cfg, ckpt_cfg = load_generator_any(args.model, device, tracking_uri=uri)
        cfg = build_config(args, ckpt_cfg)
        weights = resolve_inception_weights(cfg.eval.inception_weights, progress=progress)
        steps.update()
        steps.set_postfix_str("scoring")
        t0 = time.time()
        result = evaluate_generator(G, cfg.eval, real=args.data, device=device,
                                    endpoint_url=args.endpoint_url, seed=args.seed,
                                    progress=progress, truncation=args.truncation)
        metrics = result.scores
        steps.update()
    except known as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    record = {"model": args.model, "data": args.data, "metrics": metrics,
              "num_samples": cfg.eval.num_samples, "real_samples": cfg.eval.real_samples,
              "seed": args.seed, "device": device, "inception_weights": str(weights),
              "truncation": args.truncation, "protocol": result.protocol,
              "seconds": round(time.time() - t0, 2)}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    if uri:
        steps.set_postfix_str("logging to MLflow")
        run_id = log_to_mlflow(uri, args.experiment or cfg.tracking.experiment, record, args.out)
        record["mlflow_run_id"] = run_id
    steps.update()
    steps.close()
    for k, v in metrics.items():
        print(f"{k} {v:.6g}")
    for k, v in result.protocol.items():
        print(f"{k} {v}")
    if args.out:
        print(f"wrote {args.out}")
    if uri:
        print(f"MLflow run {record['mlflow_run_id']} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
