"""MLflow side of a sweep: the parent run, the end-of-sweep summary and `sweep-best` model.

The summary is computed from Tune's own ResultGrid (steps reached, last metric, early stop), so
the table in MLflow agrees with what Tune decided.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from pipelines.registry import describe_version, log_generator
from pipelines.tracking import RUN_NAME_TAG, experiment_id
from sagan.config import flatten

PARENT_TAG = "sagan.sweep_parent"


def parent_run(spec: Any, uri: str) -> str:
    """The sweep's parent run (found again by name when a sweep is resumed)."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, spec.base.tracking.experiment, uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{spec.name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=spec.name,
                            tags={PARENT_TAG: spec.name, RUN_NAME_TAG: spec.name})
    space = {k: {d: a} for k, (d, a) in spec.space.items()}
    client.log_text(run.info.run_id, yaml.safe_dump(
        {"search_space": space, "overrides": spec.overrides,
         "tune": {"num_samples": spec.num_samples, "metric": spec.metric, "mode": spec.mode,
                  "grace_period": spec.grace_period,
                  "max_concurrent_trials": spec.max_concurrent_trials}}, sort_keys=False),
        "sweep.yaml")
    for k, v in flatten(spec.base).items():
        if k not in spec.space:
            client.log_param(run.info.run_id, f"base.{k}", str(v)[:6000])
    return run.info.run_id


def summarize(spec: Any, results: Any) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid."""
    rows = []
    for result in results:
        m = result.metrics or {}
        step = int(m.get("step", 0) or 0)
        row = {"trial_id": m.get("trial_id") or Path(result.path).name,
               **{k: result.config.get(k) for k in spec.space},
               spec.metric: m.get(spec.metric), "steps_reached": step,
               "stopped_early": result.error is None and step < spec.base.train.steps,
               "error": type(result.error).__name__ if result.error else ""}
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (yaml.safe_dump(v, default_flow_style=True).strip()
                             if isinstance(v, list) else v) for k, v in r.items()})
    return buf.getvalue()


def _variant(spec: Any, config: dict[str, Any]) -> str:
    """A trial's searched values except its seed: the trials of one variant share it."""
    parts = [f"{k.split('.')[-1]}={yaml.safe_dump(config.get(k), default_flow_style=True)}"
             .replace("\n...", "").strip() for k in spec.space if k != "train.seed"]
    return " ".join(parts) or "base"


def _plot(spec: Any, results: Any, path: Path) -> None:
    """Metric vs step, one line per trial, one colour per variant (seeds share it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, str] = {}
    for result in results:
        df = result.metrics_dataframe
        if df is None or spec.metric not in df or "step" not in df:
            continue
        df = df.dropna(subset=[spec.metric])
        variant = _variant(spec, result.config)
        seed = result.config.get("train.seed")
        colour = colours.setdefault(variant, f"C{len(colours)}")
        label = variant if seed is None else f"{variant} seed={seed}"
        ax.plot(df["step"], df[spec.metric], marker="o", color=colour, label=label,
                linestyle=("-", "--", ":", "-.")[int(seed or 0) % 4])
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric.upper())
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs step per trial")
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _variants_table(spec: Any, rows: list[dict[str, Any]]) -> str:
    """Markdown: per variant, the last metric of each seed and their mean."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_variant(spec, {k: r.get(k) for k in spec.space}), []).append(r)
    m = spec.metric.upper()
    lines = [f"| variant | {m} per seed (last evaluation) | mean {m} | steps |",
             "| --- | --- | --- | --- |"]
    for variant, rs in groups.items():
        values = [r[spec.metric] for r in rs if r[spec.metric] is not None]
        mean = f"{sum(values) / len(values):.1f}" if values else "-"
        per_seed = ", ".join(f"{v:.1f}" for v in values) or "-"
        steps = ", ".join(str(r["steps_reached"]) for r in rs)
        lines.append(f"| {variant} | {per_seed} | {mean} | {steps} |")
    return "\n".join(lines) + "\n"


def _write_report(spec: Any, results: Any, rows: list[dict[str, Any]], plot: Path) -> None:
    """tune.report_dir: the summary, the plot, a markdown table and each trial's final EMA
    sample grid, for a results page (docs/RESULTS.md is written from one)."""
    import shutil

    from sagan.checkpoint import checkpoint_config, ema_weights
    from sagan.models import Generator
    from sagan.visualize import sample_grid, save_png

    out = Path(spec.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.csv").write_text(_table(rows))
    (out / "variants.md").write_text(_variants_table(spec, rows))
    shutil.copy(plot, out / plot.name)
    for result in results:
        state = _checkpoint_state(spec, result)
        if state is None:
            continue
        G = Generator(checkpoint_config(state).model)
        G.load_state_dict(ema_weights(state))
        seed = result.config.get("train.seed")
        name = _variant(spec, result.config) + ("" if seed is None else f" seed={seed}")
        name = name.replace("[]", "none").replace(", ", "-").replace(" ", "_")
        safe = "".join(c if c.isalnum() or c in "=-_" else "" for c in name)
        save_png(sample_grid(G.eval(), seed=0), out / f"grid_{safe}_step{state['step']}.png")
    print(f"sweep report written to {out}", flush=True)


def _checkpoint_state(spec: Any, result: Any) -> dict | None:
    """The trial's last checkpoint: Tune's own (1-worker trials), or the one its inner
    TorchTrainer reported (`checkpoint_path`, relative to the storage's filesystem: on a custom
    S3 endpoint `bucket/...` with no scheme, so the filesystem comes from the storage path)."""
    from ray.train import Checkpoint

    from pipelines.ray_cluster import storage_location
    from pipelines.train_loop import CHECKPOINT_FILE
    from sagan.checkpoint import load_checkpoint

    ckpt = result.checkpoint
    if ckpt is None and (result.metrics or {}).get("checkpoint_path"):
        _, filesystem = storage_location(spec.base.cluster.storage_path)
        ckpt = Checkpoint(path=result.metrics["checkpoint_path"], filesystem=filesystem)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def finish_sweep(spec: Any, results: Any, uri: str, parent: str) -> dict[str, Any]:
    """Log the summary table + plot to the parent run; register the best trial's EMA generator
    with alias `sweep-best` (and `champion` when it beats the current champion)."""
    client = MlflowClient(uri)
    rows = summarize(spec, results)
    client.log_text(parent, _table(rows), "sweep_summary.csv")
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / f"{spec.metric}_vs_step.png"
        _plot(spec, results, plot)
        client.log_artifact(parent, str(plot))
        client.log_text(parent, _variants_table(spec, rows), "variants.md")
        if spec.report_dir:
            _write_report(spec, results, rows, plot)
    scored = [(r[spec.metric], r, res) for r, res in zip(rows, results, strict=True)
              if r[spec.metric] is not None and r[spec.metric] == r[spec.metric]]
    summary: dict[str, Any] = {"trials": rows, "best_trial": None, "best_value": None,
                               "version": None, "parent_run_id": parent}
    if not scored:
        client.set_terminated(parent, "FAILED")
        return summary
    sign = 1 if spec.mode == "min" else -1
    value, row, result = min(scored, key=lambda s: sign * s[0])
    summary.update(best_trial=row["trial_id"], best_value=value)
    state = _checkpoint_state(spec, result)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`sagan.trial_id` = '{row['trial_id']}' and "
                      f"tags.`sagan.sweep` = '{spec.name}'", max_results=1)
    if state is not None and runs:
        from sagan.checkpoint import checkpoint_config, ema_weights

        cfg = checkpoint_config(state)
        ema = ema_weights(state)
        summary["version"] = log_generator(
            uri, runs[0].info.run_id, ema, cfg.model, spec.base.tracking.registered_model,
            fid=float(value) if spec.metric == "fid" else None, step=int(state["step"]),
            aliases=("sweep-best",))
        describe_version(uri, spec.base.tracking.registered_model, summary["version"], cfg,
                         int(state["step"]), {spec.metric: float(value)})
        summary["best_run_id"] = runs[0].info.run_id
    client.set_tag(parent, "sagan.best_trial", str(row["trial_id"]))
    client.log_metric(parent, f"best_{spec.metric}", float(value))
    client.set_terminated(parent, "FINISHED")
    return summary
