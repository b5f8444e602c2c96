"""A sweep: the YAML file (validated against the model before anything runs), its Ray Tune
search space, the trainable (one trial = one training run) and `run_sweep`.

A sweep file names a base training config, fixed overrides, a search space over SAGAN's
hyper-parameters and the Tune settings; see configs/sweep_placement.yaml. A trial with one
worker trains in the trial's process (`Session.for_tune_trial`); with more, it runs a Ray Train
TorchTrainer inside the trial (Train V2 pattern) whose reports reach Tune through
TuneReportCallback. A sweep whose driver died continues with the same command (Tune restores
from its storage path). The MLflow side (parent run, summary, sweep-best): sweep_report.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import PipelineConfig, load_run_config, run_config_from_dict
from sagan.config import ConfigError, to_dict
from sagan.errors import one_line
from sagan.eval.names import headline_keys

ROOT = Path(__file__).resolve().parents[1]  # a sweep's relative `base` is found from here

# Short names users write in a sweep file -> config fields.
PARAMS = {
    "lr_g": "train.lr_g", "lr_d": "train.lr_d", "beta2": "train.beta2", "ndis": "train.ndis",
    "gamma_init": "model.gamma_init", "gamma_learnable": "model.gamma_learnable",
    "g_attention": "model.g_attention", "d_attention": "model.d_attention",
    "attention": "model.attention",  # both nets at once: the paper's placement ablation
    "seed": "train.seed",  # repeats of one setting: seed-to-seed spread next to the effect
    "diffaugment": "train.diffaugment",
}
JOINT = {"model.attention": ("model.g_attention", "model.d_attention")}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
SWEEP_KEYS = {"base", "overrides", "search_space", "tune"}
TUNE_KEYS = {"name", "num_samples", "max_concurrent_trials", "metric", "mode", "grace_period",
             "reduction_factor", "storage_path", "seed", "scheduler", "report_dir"}


class SweepError(ValueError):
    """Invalid sweep file; the message names the field."""


def _as_overrides(key: str, value: Any) -> list[str]:
    """KEY=VALUE override strings for one sampled value (a joint key expands to several)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    return [f"{k}={text}" for k in JOINT.get(key, (key,))]


@dataclass
class SweepSpec:
    base: PipelineConfig
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
    # asha: stop bad trials early on the metric; none: every trial runs all train.steps (a
    # comparison whose curves must all reach the end, e.g. configs/results_attention.yaml)
    scheduler: str = "asha"
    report_dir: str | None = None  # also write the summary, plot and final grids here


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
    base = load_run_config(p, overrides)
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
        for value in args:  # the bounds of a range, every value of a choice or grid
            try:
                run_config_from_dict(to_dict(base), _as_overrides(key, value))
            except ConfigError as exc:
                raise SweepError(f"{where}: search_space.{name}: value {value!r} is invalid "
                                 f"({exc})") from None
        space[key] = (dist, args)
    t = data.get("tune") or {}
    for key in t:
        if key not in TUNE_KEYS:
            raise SweepError(f"{where}: unknown key 'tune.{key}' (valid: "
                             f"{', '.join(sorted(TUNE_KEYS))})")
    spec = SweepSpec(base=base, overrides=overrides, space=space,
                     **{k: v for k, v in t.items()})
    choices = [*headline_keys(), "loss_g", "loss_d"]
    if spec.metric not in choices:
        raise SweepError(f"{where}: tune.metric must be one of {', '.join(choices)}")
    if spec.mode not in ("min", "max"):
        raise SweepError(f"{where}: tune.mode must be 'min' or 'max'")
    if spec.scheduler not in ("asha", "none"):
        raise SweepError(f"{where}: tune.scheduler must be 'asha' or 'none', got "
                         f"{spec.scheduler!r}")
    if spec.metric in headline_keys() and base.eval.eval_every <= 0:
        raise SweepError(f"{where}: tune.metric={spec.metric} needs eval.eval_every > 0 in the "
                         "base config or overrides")
    for k in ("num_samples", "max_concurrent_trials", "grace_period", "reduction_factor"):
        if not isinstance(getattr(spec, k), int) or getattr(spec, k) < 1:
            raise SweepError(f"{where}: tune.{k} must be a positive integer")
    if spec.scheduler == "asha" and \
            spec.grace_period * max(base.eval.eval_every, 1) > base.train.steps:
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


def trial_config(spec: SweepSpec, params: dict[str, Any], trial_name: str) -> PipelineConfig:
    overrides = [o for k, v in params.items() for o in _as_overrides(k, v)]
    return run_config_from_dict(to_dict(spec.base), overrides + [f"cluster.run_name={trial_name}"])


# --------------------------------------------------------------------------- the trainable


def trainable(params: dict[str, Any], spec: SweepSpec, tracking_uri: str, parent: str) -> None:
    """One Tune trial = one training run (a nested MLflow run under the sweep's parent): in
    the trial's own process with one worker, else a TorchTrainer inside the trial."""
    import ray.tune

    from pipelines.driver import TrainingStopped, run_training
    from pipelines.preflight import ensure_data
    from pipelines.session import Session
    from pipelines.tracking import find_or_create_run
    from pipelines.train_loop import EXIT_KEY, STOPPED_KEY, run_loop

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(spec, params, f"{spec.name}-{trial_id}")
    run_id, _ = find_or_create_run(cfg, tracking_uri, parent_run_id=parent,
                                   extra_tags={"sagan.sweep": spec.name,
                                               "sagan.trial_id": trial_id})
    if cfg.cluster.max_workers > 1:
        from ray.tune.integration.ray_train import TuneReportCallback

        run_training(cfg, tracking_uri, register_model=False, parent_run_id=parent,
                     callbacks=[TuneReportCallback()])
        return
    ensure_data(cfg)
    stopped = run_loop(Session.for_tune_trial(), cfg, tracking_uri, run_id)
    if stopped:  # Tune marks the trial errored
        raise TrainingStopped(stopped[STOPPED_KEY], stopped[EXIT_KEY])


# --------------------------------------------------------------------------- driver


def run_sweep(spec: SweepSpec, tracking_uri: str) -> dict[str, Any]:
    """Run (or resume) the sweep; log the summary and register the best generator."""
    import dataclasses

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipelines.driver import prepare
    from pipelines.preflight import refuse_relative_on_many_nodes
    from pipelines.ray_cluster import alive_nodes, connect
    from pipelines.sweep_report import finish_sweep, parent_run

    base, tracking_uri, relative = prepare(spec.base, tracking_uri)  # trials run elsewhere
    spec = dataclasses.replace(spec, base=base)
    print(f"sweeping on {connect()}", flush=True)
    refuse_relative_on_many_nodes(relative, alive_nodes())
    parent = parent_run(spec, tracking_uri)
    storage = str(Path(spec.storage_path).expanduser().resolve()) \
        if "://" not in spec.storage_path else spec.storage_path
    c = spec.base.cluster
    resources = {"cpu": c.cpus_per_worker, "gpu": c.gpus_per_worker} if c.max_workers == 1 else \
        {"cpu": 1}
    trial = tune.with_resources(tune.with_parameters(
        trainable, spec=spec, tracking_uri=tracking_uri, parent=parent), resources)
    path = f"{storage}/{spec.name}"
    scheduler = None if spec.scheduler == "none" else ASHAScheduler(
        time_attr="step", max_t=spec.base.train.steps,
        grace_period=spec.grace_period * spec.base.eval.eval_every,
        reduction_factor=spec.reduction_factor)
    if tune.Tuner.can_restore(path):
        print(f"resuming sweep from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trial, resume_errored=True,
                                   restart_errored=False)
    else:
        from ray.tune import RunConfig

        tuner = tune.Tuner(
            trial, param_space=tune_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                        num_samples=spec.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=spec.max_concurrent_trials),
            run_config=RunConfig(name=spec.name, storage_path=storage))
    results = tuner.fit()
    return finish_sweep(spec, results, tracking_uri, parent)
