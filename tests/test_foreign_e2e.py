"""Issue 25 end to end on the real stack (SeaweedFS S3, MLflow, Ray with its job server): real
RGB images (Noto emoji, infra/local/emoji.py) written by `webdataset.ShardWriter` as `jpg` +
`cls` shards into S3, indexed as Ray tasks, trained via `ray job submit` with no conversion, and
registered; `prepare_data.py` as Ray tasks writes the same bytes as in one process."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from infra.local import emoji
from tests.fixtures.stack import JOB_TINY, ROOT, runs_named, submit_job

pytestmark = pytest.mark.slow


def _run(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=stack.environ(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def emoji_shards(local_stack) -> dict[str, str]:
    """The emoji train and test splits as foreign shards in the stack's S3 (written once)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_stack.environ().items():
            mp.setenv(key, value)
        prefix = f"s3://{local_stack.bucket}/foreign"
        n_train, train_shards, classes = emoji.write(prefix, "train", per_shard=500)
        n_test, test_shards, _ = emoji.write(prefix, "test", per_shard=500)
    assert (n_train, train_shards, n_test, len(classes)) == (3192, 7, 589, 9)
    return {"train": f"{prefix}/emoji-train-{{000000..{train_shards - 1:06d}}}.tar",
            "test": f"{prefix}/emoji-test-{{000000..{test_shards - 1:06d}}}.tar",
            "prefix": prefix, "n_test": str(n_test)}


def test_index_data_scans_shards_as_ray_tasks(local_stack, emoji_shards):
    """`python pipelines/index_data.py 's3://my-bucket/ds/train-{000000..001023}.tar'`, here on
    the stack's Ray cluster with the index under another prefix (a read-only bucket's case)."""
    idx = f"s3://{local_stack.bucket}/idx/emoji-train"
    proc = _run(local_stack, "pipelines/index_data.py", emoji_shards["train"], "--out", idx,
                "--no-progress")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r": 7 Ray task\(s\) on the Ray cluster at \S+ \(4 CPUs\)", out), out
    assert "indexed 3192 samples in 7 shards (9 classes; keys cls, jpg, json; image sizes " \
           "64x64)" in out
    assert f"index: {idx}/manifest.json" in out
    from sagan.data import load_manifest

    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_stack.environ().items():
            mp.setenv(key, value)
        m = load_manifest(emoji_shards["train"], index=idx)
    assert m.total == 3192 and sum(int(v) for v in m.index["class_counts"].values()) == 3192
    assert m.shard_base == emoji_shards["prefix"]
    # a brace list naming a shard that is not there: one line naming it, nothing written
    proc = _run(local_stack, "pipelines/index_data.py",
                f"{emoji_shards['prefix']}/emoji-train-{{000005..000009}}.tar", "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: shard {emoji_shards['prefix']}/emoji-train-000007.tar (named by "
        f"{emoji_shards['prefix']}/emoji-train-{{000005..000009}}.tar) does not exist")


def test_foreign_shards_train_a_registered_model_via_ray_job(local_stack, emoji_shards,
                                                             inception_weights, tmp_path):
    """`ray job submit ... -- python pipelines/train.py --config configs/sagan64.yaml
    'data.path=s3://my-bucket/ds/train-{000000..001023}.tar' model.num_classes=1000`: jpg + cls
    shards train at 64 px with no conversion; the held-out split, never indexed before, is
    indexed by the driver on first use (as Ray tasks) and FID is measured against it."""
    idx = f"s3://{local_stack.bucket}/idx/emoji-train"
    proc = submit_job(local_stack, [
        "pipelines/train.py", "--config", "configs/sagan64.yaml", *JOB_TINY,
        "model.g_attention=[16]", "model.d_attention=[16]", "model.num_classes=9",
        "cluster.gpus_per_worker=0",
        f"data.path={emoji_shards['train']}", f"data.index={idx}", "data.fit=crop",
        "train.steps=4", "train.log_every=2", "train.ckpt_every=4", "train.sample_every=4",
        "train.ema_start=2", f"cluster.storage_path={tmp_path / 'runs'}",
        "cluster.run_name=emoji-e2e", "tracking.experiment=sagan-quickstart",
        "tracking.registered_model=emoji-e2e-gen", "eval.eval_every=4",
        "eval.num_samples=20", "eval.real_samples=20", "eval.batch_size=10",
        f"eval.real_path={emoji_shards['test']}", f"eval.inception_weights={inception_weights}",
        f"eval.cache_dir={tmp_path / 'fid'}"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "done: step 4/4" in out
    assert out.count("no index of") == 1  # the test split only: the train index was given
    assert f"eval.real_path: no index of {emoji_shards['test']} yet" in out
    assert "indexed 589 samples in 2 shards (9 classes" in out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(local_stack.mlflow_uri)
    (run,) = runs_named(local_stack, "emoji-e2e")
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == emoji_shards["train"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid")] == [4]
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert emoji_shards["prefix"] in inputs["emoji-train-{000000..000006}.tar"].source
    (version,) = client.search_model_versions("name='emoji-e2e-gen'")
    assert version.run_id == run.info.run_id

    from pipelines.model_io import load_generator_any

    G, mcfg, _ = load_generator_any("models:/emoji-e2e-gen/1",
                                    tracking_uri=local_stack.mlflow_uri)
    z, y = G.sample_inputs(3)
    assert G(z, y).shape == (3, 3, 64, 64) and mcfg.num_classes == 9

    # the index the driver wrote beside the test shards is found by the next run
    from sagan.data import load_manifest

    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_stack.environ().items():
            mp.setenv(key, value)
        assert load_manifest(emoji_shards["test"]).total == int(emoji_shards["n_test"])


def test_prepare_as_ray_tasks_writes_the_same_dataset(local_stack, stack_shards):
    """`prepare_data.py` on the stack (RAY_ADDRESS names its cluster, so it uses Ray tasks):
    the same manifest content hash as the single-process `stack_shards` fixture."""
    from sagan.data import load_manifest

    out = f"s3://{local_stack.bucket}/fashion-600-ray"
    proc = _run(local_stack, "pipelines/prepare_data.py", "fashion-mnist", out, "--limit", "600",
                "--samples-per-shard", "100", "--shards-per-task", "2", "--no-progress")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"writing \S+: 3 Ray task\(s\) on the Ray cluster at", text), text
    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_stack.environ().items():
            mp.setenv(key, value)
        ray_made, single = load_manifest(out), load_manifest(stack_shards)
    assert ray_made.content_hash() == single.content_hash()
    assert [s.sha256 for s in ray_made.shards] == [s.sha256 for s in single.shards]
    assert f"content hash {single.content_hash()[:16]}" in text
