"""Hyper-parameter sweeps of SAGAN training on Ray Tune, with ASHA on FID and MLflow tracking.

    python pipelines/tune.py --config configs/sweep_placement.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/tune.py --config configs/sweep_placement.yaml

A sweep file names a base training config, fixed overrides, a search space over SAGAN's
hyper-parameters and the Tune settings; see configs/sweep_placement.yaml. Each trial is one
training run: in-process when it has one worker, else a Ray Train TorchTrainer inside the trial
(Train V2 pattern) whose reports reach Tune through TuneReportCallback. A sweep whose driver died
continues with the same command (Tune restores from its storage path).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from sagan.config import Config, ConfigError, config_from_dict, load_config, to_dict  # noqa: E402
from sagan.errors import one_line  # noqa: E402

# Short names users write in a sweep file -> config fields.
PARAMS = {
    "lr_g": "train.lr_g", "lr_d": "train.lr_d", "beta2": "train.beta2", "ndis": "train.ndis",
    "gamma_init": "model.gamma_init", "gamma_learnable": "model.gamma_learnable",
    "g_attention": "model.g_attention", "d_attention": "model.d_attention",
    "attention": "model.attention",  # both nets at once: the paper's placement ablation
}
JOINT = {"model.attention": ("model.g_attention", "model.d_attention")}


def _as_overrides(key: str, value: Any) -> list[str]:
    """KEY=VALUE override strings for one sampled value (a joint key expands to several)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    return [f"{k}={text}" for k in JOINT.get(key, (key,))]
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
SWEEP_KEYS = {"base", "overrides", "search_space", "tune"}
TUNE_KEYS = {"name", "num_samples", "max_concurrent_trials", "metric", "mode", "grace_period",
             "reduction_factor", "storage_path", "seed"}


class SweepError(ValueError):
    """Invalid sweep file; the message names the field."""


@dataclass
class SweepSpec:
    base: Config
    base_dict: dict
    overrides: list[str]
    space: dict[str, tuple[str, list]]  # config key -> (distribution, args)
    name: str = "sweep"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    metric: str = "fid"
    mode: str = "min"
    grace_period: int = 1
    reduction_factor: int = 2
    storage_path: str = "~/sagan-runs/tune"
    seed: int = 0
    extra: dict = field(default_factory=dict)


def parse_sweep(data: dict, where: str = "sweep", cli_overrides: list[str] | None = None
                ) -> SweepSpec:
    """Validate a sweep mapping. Every choice is checked by building the full config it would
    produce, so an invalid attention placement fails here, not in trial 7 after an hour."""
    if not isinstance(data, dict):
        raise SweepError(f"{where}: top level must be a mapping")
    for key in data:
        if key not in SWEEP_KEYS:
            raise SweepError(
                f"{where}: unknown key '{key}' (valid: {', '.join(sorted(SWEEP_KEYS))})")
    base_path = data.get("base", "configs/quickstart.yaml")
    p = Path(base_path)
    if not p.is_absolute():
        p = ROOT / p
    overrides = list(data.get("overrides") or []) + list(cli_overrides or [])
    base = load_config(p, overrides)
    base_dict = yaml.safe_load(p.read_text()) or {}
    space_in = data.get("search_space") or {}
    if not isinstance(space_in, dict) or not space_in:
        raise SweepError(f"{where}: 'search_space' must be a non-empty mapping")
    space: dict[str, tuple[str, list]] = {}
    for name, spec in space_in.items():
        key = PARAMS.get(name, name)
        if key not in PARAMS.values():
            raise SweepError(f"{where}: search_space: unknown parameter '{name}' (valid: "
                             f"{', '.join(PARAMS)})")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SweepError(f"{where}: search_space.{name}: expected one of "
                             f"{{{', '.join(DISTRIBUTIONS)}: ...}}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise SweepError(f"{where}: search_space.{name}: unknown distribution '{dist}' "
                             f"(valid: {', '.join(DISTRIBUTIONS)})")
        if not isinstance(args, list) or not args:
            raise SweepError(f"{where}: search_space.{name}.{dist}: expected a non-empty list")
        if dist in ("loguniform", "uniform"):
            if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or \
                    args[0] >= args[1] or (dist == "loguniform" and args[0] <= 0):
                raise SweepError(f"{where}: search_space.{name}.{dist}: expected [low, high] "
                                 f"with 0 < low < high, got {args}")
            probes = args
        else:
            probes = args
        for value in probes:
            try:
                config_from_dict(to_dict(base), _as_overrides(key, value))
            except ConfigError as exc:
                raise SweepError(f"{where}: search_space.{name}: value {value!r} is invalid "
                                 f"({exc})") from None
        space[key] = (dist, args)
    t = data.get("tune") or {}
    for key in t:
        if key not in TUNE_KEYS:
            raise SweepError(f"{where}: unknown key 'tune.{key}' (valid: "
                             f"{', '.join(sorted(TUNE_KEYS))})")
    spec = SweepSpec(base=base, base_dict=base_dict, overrides=overrides, space=space,
                     **{k: v for k, v in t.items()})
    if spec.metric not in ("fid", "kid", "is", "loss_g", "loss_d"):
        raise SweepError(f"{where}: tune.metric must be fid, kid, is, loss_g or loss_d")
    if spec.mode not in ("min", "max"):
        raise SweepError(f"{where}: tune.mode must be 'min' or 'max'")
    if spec.metric in ("fid", "kid", "is") and base.eval.eval_every <= 0:
        raise SweepError(f"{where}: tune.metric={spec.metric} needs eval.eval_every > 0 in the "
                         "base config or overrides")
    for k in ("num_samples", "max_concurrent_trials", "grace_period", "reduction_factor"):
        if not isinstance(getattr(spec, k), int) or getattr(spec, k) < 1:
            raise SweepError(f"{where}: tune.{k} must be a positive integer")
    if spec.grace_period * max(base.eval.eval_every, 1) > base.train.steps:
        raise SweepError(f"{where}: tune.grace_period={spec.grace_period} evaluations x "
                         f"eval.eval_every={base.eval.eval_every} is more than "
                         f"train.steps={base.train.steps}")
    return spec


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep file '{p}': not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file '{p}': invalid YAML ({one_line(exc, 160)})") from None
    return parse_sweep(data, where=f"sweep file '{p}'", cli_overrides=cli_overrides)


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, (dist, args) in spec.space.items():
        out[key] = {"loguniform": lambda a: tune.loguniform(*a),
                    "uniform": lambda a: tune.uniform(*a),
                    "choice": tune.choice, "grid": tune.grid_search}[dist](args)
    return out


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_name: str) -> Config:
    overrides = [o for k, v in params.items() for o in _as_overrides(k, v)]
    return config_from_dict(to_dict(spec.base), overrides + [f"train.run_name={trial_name}"])


# --------------------------------------------------------------------------- the trainable


def _trainable(trial_params: dict[str, Any]) -> None:
    """One Tune trial = one training run (nested MLflow run under the sweep's parent)."""
    import ray.tune

    from pipelines.preflight import ensure_data
    from pipelines.tracking import find_or_create_run
    from pipelines.train import run_training
    from pipelines.train_loop import train_loop_per_worker

    spec: SweepSpec = trial_params.pop("__spec__")
    uri, parent = trial_params.pop("__tracking_uri__"), trial_params.pop("__parent_run__")
    ctx = ray.tune.get_context()
    cfg = trial_config(spec, trial_params, f"{spec.name}-{ctx.get_trial_id()}")
    run_id, _ = find_or_create_run(cfg, uri, parent_run_id=parent,
                                   extra_tags={"sagan.sweep": spec.name,
                                               "sagan.trial_id": ctx.get_trial_id()})
    if cfg.train.workers == 1:
        os.environ["SAGAN_TUNE_INPROCESS"] = "1"
        ensure_data(cfg)
        train_loop_per_worker({"config": to_dict(cfg), "tracking_uri": uri, "run_id": run_id})
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        run_training(cfg, uri, register=False, parent_run_id=parent,
                     callbacks=[TuneReportCallback()])


# --------------------------------------------------------------------------- driver


def run_sweep(spec: SweepSpec, tracking_uri: str) -> dict[str, Any]:
    """Run (or resume) the sweep; log the summary and register the best generator."""
    import dataclasses

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipelines.preflight import (
        absolute_tracking_uri,
        ensure_data,
        localize_paths,
        refuse_relative_on_many_nodes,
    )
    from pipelines.ray_cluster import alive_nodes, connect
    from pipelines.sweep_report import finish_sweep, parent_run
    from pipelines.tracking import check_reachable

    tracking_uri = absolute_tracking_uri(tracking_uri)
    check_reachable(tracking_uri)
    base, relative = localize_paths(spec.base)  # trials run in their own directories
    spec = dataclasses.replace(spec, base=base)
    ensure_data(spec.base)
    print(f"sweeping on {connect()}", flush=True)
    refuse_relative_on_many_nodes(relative, alive_nodes())
    parent = parent_run(spec, tracking_uri)
    storage = str(Path(spec.storage_path).expanduser().resolve()) \
        if "://" not in spec.storage_path else spec.storage_path
    t = spec.base.train
    resources = {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker} if t.workers == 1 else \
        {"cpu": 1}
    trainable = tune.with_resources(tune.with_parameters(
        _trainable_entry, spec=spec, tracking_uri=tracking_uri, parent=parent), resources)
    path = f"{storage}/{spec.name}"
    scheduler = ASHAScheduler(time_attr="step", max_t=t.steps,
                              grace_period=spec.grace_period * spec.base.eval.eval_every,
                              reduction_factor=spec.reduction_factor)
    if tune.Tuner.can_restore(path):
        print(f"resuming sweep from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                   restart_errored=False)
    else:
        from ray.tune import RunConfig

        tuner = tune.Tuner(
            trainable, param_space=tune_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                        num_samples=spec.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=spec.max_concurrent_trials),
            run_config=RunConfig(name=spec.name, storage_path=storage))
    results = tuner.fit()
    return finish_sweep(spec, results, tracking_uri, parent)


def _trainable_entry(params: dict[str, Any], spec: SweepSpec, tracking_uri: str,
                     parent: str) -> None:
    _trainable({**params, "__spec__": spec, "__tracking_uri__": tracking_uri,
                "__parent_run__": parent})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sweep SAGAN hyper-parameters with Ray Tune "
                                "(ASHA on FID), tracked in MLflow.")
    p.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_placement.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides applied to the base training config of every trial")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                   "else ./mlruns sqlite store)")
    p.add_argument("--storage-path", help="where Tune keeps the sweep's state and checkpoints "
                   "(tune.storage_path; a sweep found there is resumed)")
    args = p.parse_intermixed_args(argv)
    from pipelines.preflight import PreflightError
    from pipelines.tracking import TrackingError, resolve_tracking_uri

    try:
        overrides = list(args.overrides)
        if args.tracking_uri:
            overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
        spec = load_sweep(args.config, overrides)
        if args.storage_path:
            spec.storage_path = args.storage_path
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
