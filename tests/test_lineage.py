"""A run's inputs in MLflow (pipelines/lineage.py) and the progress line: datasets logged with
their manifest digest and profile into a real (sqlite) MLflow store, the code version from git
or from the submitter's environment, and the ETA arithmetic."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipelines.config import load_run_config
from pipelines.lineage import (
    COMMIT_ENV,
    DIRTY_ENV,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    REPO_ROOT,
    code_version,
    log_datasets,
    main,
    run_datasets,
    runtime_env,
)
from pipelines.train_loop import _progress
from tests.fixtures.fashion import write_fashion_shards


def test_datasets_logged_with_manifest_digest_and_profile(fashion_subset, fashion_shards,
                                                          tmp_path):
    from mlflow.tracking import MlflowClient

    path = fashion_shards.location
    real = write_fashion_shards(fashion_subset, str(tmp_path / "real"), per_shard=300)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("x")
    for real_path, contexts in ((None, ["training"]), (real.location, ["evaluation", "training"])):
        overrides = [f"data.path={path}", "eval.eval_every=10"]
        cfg = load_run_config(None, overrides + ([f"eval.real_path={real_path}"] if real_path
                                                 else []))
        run_id = client.create_run(exp).info.run_id
        log_datasets(client, run_id, run_datasets(cfg))  # the same set is one input in MLflow
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert sorted(i.tags[0].value for i in inputs) == contexts

    ds = next(i.dataset for i in inputs if i.tags[0].value == "training")
    assert ds.digest == fashion_shards.content_hash()[:16]
    assert json.loads(ds.source) == {"uri": path}
    profile = json.loads(ds.profile)
    assert profile["images"] == 600 and profile["shards"] == 6 and profile["num_classes"] == 10
    assert profile["classes"].startswith("T-shirt/top, Trouser")


def test_code_version_from_git_and_from_the_submitter(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    tags = code_version()
    assert tags[GIT_COMMIT_TAG] == head and tags[GIT_DIRTY_TAG] in ("true", "false")
    assert tags["sagan.version"]

    env = runtime_env({"excludes": ["/.git/"]})
    assert env["excludes"] == ["/.git/"]
    assert env["env_vars"] == {COMMIT_ENV: head, DIRTY_ENV: tags[GIT_DIRTY_TAG]}

    # a job's uploaded copy has no .git: the commit comes from the runtime env
    monkeypatch.setenv(COMMIT_ENV, "abc1234")
    monkeypatch.setenv(DIRTY_ENV, "false")
    tags = code_version()
    assert tags[GIT_COMMIT_TAG] == "abc1234" and tags[GIT_DIRTY_TAG] == "false"


def test_code_version_outside_a_checkout_has_no_commit(tmp_path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    assert GIT_COMMIT_TAG not in code_version(tmp_path)


def test_lineage_cli_rejects_bad_json(capsys):
    assert main(["--runtime-env", "{not json"]) == 2
    assert capsys.readouterr().err.startswith("error: --runtime-env: not JSON")


@pytest.mark.parametrize("step,rate,eta", [(30, 10.0, "ETA 0m27s"), (0, 0.0, "ETA ?"),
                                           (1, 1 / 3600, "ETA 299h00m")])
def test_progress_line(step, rate, eta):
    line = _progress(step, 300, {"loss_d": 1.5, "img_per_s": 42.25}, rate)
    assert line.startswith(f"step {step}/300 ({100 * step // 300}%) 42.2 img/s {eta} ")
    assert line.endswith("loss_d=1.5")
