"""Issue 6: Ray Tune sweeps (ASHA on FID) tracked in MLflow, and the search-space parser."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import pytest
import yaml

from pipelines.sweep import SweepError, parse_sweep
from tests.fixtures.stack import ROOT, stop_job, submit_job, submitted_job_id, sweep_runs

# --------------------------------------------------------------------------- parser


def test_parser_accepts_the_shipped_sweeps():
    for name in ("sweep_placement.yaml", "sweep_lr.yaml", "results_attention.yaml",
                 "results_diffaugment.yaml"):
        data = yaml.safe_load((ROOT / "configs" / name).read_text())
        spec = parse_sweep(data)
        assert spec.metric == "fid" and spec.base.eval.eval_every > 0


@pytest.mark.parametrize("space, message", [
    ({"lr_gg": {"loguniform": [1e-4, 1e-3]}}, "unknown parameter 'lr_gg'"),
    ({"attention": {"grid": [[], [64]]}}, "search_space.attention: value [64] is invalid"),
    ({"g_attention": {"choice": [[4]]}}, "search_space.g_attention: value [4] is invalid"),
    ({"d_attention": {"choice": [[32]]}}, "'model.d_attention'"),
    ({"lr_d": {"loguniform": [0, 1e-3]}}, "expected [low, high] with 0 < low < high"),
    ({"lr_d": {"normal": [1, 2]}}, "unknown distribution 'normal'"),
    ({"ndis": {"choice": [0]}}, "'train.ndis'"),
])
def test_parser_rejects_bad_space_with_one_clear_line(space, message):
    data = {"search_space": space, "overrides": ["eval.eval_every=10"]}
    with pytest.raises(SweepError) as info:
        parse_sweep(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parser_rejects_bad_sections():
    ok_space = {"lr_d": {"choice": [2e-4]}}
    with pytest.raises(SweepError, match="unknown key 'tune.shedule'"):
        parse_sweep({"search_space": ok_space, "tune": {"shedule": "asha"},
                     "overrides": ["eval.eval_every=10"]})
    with pytest.raises(SweepError, match="needs eval.eval_every > 0"):
        parse_sweep({"search_space": ok_space, "overrides": ["eval.eval_every=0"]})
    with pytest.raises(SweepError, match="unknown key 'searchspace'"):
        parse_sweep({"searchspace": ok_space})
    with pytest.raises(SweepError, match="tune.scheduler must be 'asha' or 'none'"):
        parse_sweep({"search_space": ok_space, "tune": {"scheduler": "fifo"},
                     "overrides": ["eval.eval_every=10"]})
    # no early stopping: a grace period longer than the run is no error then
    spec = parse_sweep({"search_space": {"seed": {"grid": [0, 1]}},
                        "tune": {"scheduler": "none", "grace_period": 99},
                        "overrides": ["eval.eval_every=10", "train.steps=20"]})
    assert spec.space == {"train.seed": ("grid", [0, 1])}


# --------------------------------------------------------------------------- a real sweep


def _submit(stack, sweep: Path, wait: bool = True):
    return submit_job(stack, ["pipelines/tune.py", "--config", str(sweep)], wait=wait,
                      timeout=900)


@pytest.mark.slow
def test_sweep_asha_mlflow_and_resume(local_stack, fashion_shards, inception_weights,
                                      tmp_path):
    """The README's `ray job submit --address http://HEAD:8265 --working-dir . -- python
    pipelines/tune.py --config configs/sweep_placement.yaml`, with a small sweep file of the same
    kind (4 trials): ASHA stops trials early on FID, every trial has a nested MLflow run, the
    summary agrees with Tune, sweep-best is registered, and a sweep whose driver was stopped
    resumes with the same command."""
    storage = tmp_path / "tune"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": "configs/quickstart.yaml",
        "overrides": [
            "model.g_ch=8", "model.d_ch=8", "model.z_dim=32", "train.batch_size=16",
            "train.workers=1", "train.steps=30", "train.ckpt_every=10", "train.log_every=10",
            "train.sample_every=30", "eval.eval_every=10", "eval.num_samples=16",
            "eval.real_samples=16", "eval.batch_size=16", "eval.metrics=[fid]",
            f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}",
            f"data.path={fashion_shards.location}", "data.loader_workers=0",
            f"eval.real_path={fashion_shards.location}", "tracking.registered_model=sweep-gen",
            "tracking.experiment=sweep-test"],
        "search_space": {"attention": {"grid": [[], [16]]},
                         "lr_d": {"grid": [2.0e-4, 4.0e-4]}},
        "tune": {"name": "t-sweep", "num_samples": 1, "max_concurrent_trials": 2,
                 "metric": "fid", "mode": "min", "grace_period": 1, "reduction_factor": 2,
                 "storage_path": str(storage)},
    }))

    # The driver dies mid-sweep (job stopped once a trial has checkpointed) ...
    first = _submit(local_stack, sweep, wait=False)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = submitted_job_id(first)
    deadline = time.time() + 400
    while not list(storage.glob("t-sweep/*/checkpoint_*")):
        assert time.time() < deadline, "no trial checkpoint within 400 s"
        time.sleep(0.5)
    stop_job(local_stack, job_id)

    # ... and the same command resumes it from its storage path.
    again = _submit(local_stack, sweep)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert "resuming sweep from" in out
    assert "sweep t-sweep: 4 trials" in out

    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(storage / "t-sweep"))
    tune_trials = {t.trial_id: t for t in analysis.trials}
    assert len(tune_trials) == 4
    for t in tune_trials.values():
        df = analysis.trial_dataframes[t.trial_id]
        assert df["fid"].notna().sum() >= 1, t.trial_id  # every trial reported FID
        assert set(df["step"].dropna().astype(int)) <= {10, 20, 30}
    steps = {tid: int(t.last_result["step"]) for tid, t in tune_trials.items()}
    assert max(steps.values()) == 30
    assert min(steps.values()) < 30  # ASHA stopped at least one trial early (reduction 2)

    client = MlflowClient(local_stack.mlflow_uri)
    parent, children = sweep_runs(local_stack, "t-sweep", experiment="sweep-test")
    assert len(children) == 4  # one nested run per trial, none duplicated by the resume
    by_trial = {c.data.tags["sagan.trial_id"]: c for c in children}
    assert set(by_trial) == set(tune_trials)

    # The summary table agrees with Tune's own results.
    local = Path(client.download_artifacts(parent.info.run_id, "sweep_summary.csv",
                                           str(tmp_path)))
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(local.read_text()))}
    assert set(rows) == set(tune_trials)
    for tid, t in tune_trials.items():
        assert int(rows[tid]["steps_reached"]) == steps[tid]
        assert rows[tid]["stopped_early"] == str(steps[tid] < 30)
        assert float(rows[tid]["fid"]) == pytest.approx(t.last_result["fid"])
    assert "fid_vs_step.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # sweep-best is the trial with the lowest (final) FID, registered from its nested run.
    best_tid = min(tune_trials, key=lambda tid: tune_trials[tid].last_result["fid"])
    best = client.get_model_version_by_alias("sweep-gen", "sweep-best")
    assert best.run_id == by_trial[best_tid].info.run_id
    assert float(best.tags["fid"]) == pytest.approx(tune_trials[best_tid].last_result["fid"],
                                                    rel=1e-5)
    champion = client.get_model_version_by_alias("sweep-gen", "champion")
    assert champion.version == best.version  # first FID-scored version becomes champion


@pytest.mark.slow
def test_readme_placement_sweep(local_stack, fashion_shards, inception_weights, tmp_path):
    """The README's `python pipelines/tune.py --config configs/sweep_placement.yaml` as a driver
    on the stack's cluster, all 8 trials of its grid made small by base-config overrides (a
    width-8 model, 2 steps, FID on 8 samples): every trial reports FID and the best one is
    registered as sweep-best."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    proc = subprocess.run(
        [sys.executable, "pipelines/tune.py", "--config", "configs/sweep_placement.yaml",
         "--storage-path", str(tmp_path / "tune"), "model.g_ch=8", "model.d_ch=8",
         "model.z_dim=32", "train.batch_size=8", "train.steps=2", "train.ckpt_every=2",
         "train.log_every=1", "train.sample_every=0", "eval.eval_every=1",
         "eval.num_samples=8", "eval.real_samples=8", "eval.batch_size=8", "eval.metrics=[fid]",
         f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}",
         f"data.path={fashion_shards.location}", "data.loader_workers=0",
         f"eval.real_path={fashion_shards.location}",
         "data.shuffle_buffer=50", "tracking.registered_model=readme-sweep-gen",
         "tracking.experiment=readme-sweep"],
        env=local_stack.environ(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "sweep sweep-placement: 8 trials" in out
    client = MlflowClient(local_stack.mlflow_uri)
    best = client.get_model_version_by_alias("readme-sweep-gen", "sweep-best")
    assert float(best.tags["fid"]) > 0


@pytest.mark.slow
def test_results_sweep_runs_every_trial_to_the_end_and_writes_the_report(
        local_stack, fashion_shards, inception_weights, tmp_path):
    """docs/RESULTS.md's `python pipelines/tune.py --config configs/results_attention.yaml`,
    made small: no early stopping (all 4 trials reach train.steps), and the report directory
    holds the FID-vs-step plot, a per-variant table over both seeds and each final grid."""
    import subprocess
    import sys

    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "pipelines/tune.py", "--config", "configs/results_attention.yaml",
         "--storage-path", str(tmp_path / "tune"), "--report-dir", str(report),
         "model.g_ch=8", "model.d_ch=8", "model.z_dim=32", "train.batch_size=8",
         "train.steps=4", "train.ckpt_every=2", "train.sample_every=0", "train.log_every=2",
         "eval.eval_every=2", "eval.num_samples=8", "eval.real_samples=8",
         "eval.batch_size=8", "eval.metrics=[fid]",
         f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}",
         f"data.path={fashion_shards.location}", f"eval.real_path={fashion_shards.location}",
         "data.loader_workers=0", "data.shuffle_buffer=50",
         "tracking.registered_model=results-gen", "tracking.experiment=results-test"],
        env=local_stack.environ(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    rows = list(csv.DictReader(io.StringIO((report / "summary.csv").read_text())))
    assert len(rows) == 4 and all(r["steps_reached"] == "4" for r in rows)
    assert sorted((r["model.attention"], r["train.seed"]) for r in rows) == \
        [("[16]", "0"), ("[16]", "1"), ("[]", "0"), ("[]", "1")]
    table = (report / "variants.md").read_text().splitlines()
    assert table[2].startswith("| attention=[16] | ") and table[3].startswith("| attention=[] | ")
    assert all(len(line.split("|")[2].split(",")) == 2 for line in table[2:])  # two seeds each
    assert (report / "fid_vs_step.png").stat().st_size > 10_000
    grids = sorted(p.name for p in report.glob("grid_*.png"))
    assert grids == ["grid_attention=16_seed=0_step4.png", "grid_attention=16_seed=1_step4.png",
                     "grid_attention=none_seed=0_step4.png",
                     "grid_attention=none_seed=1_step4.png"]
