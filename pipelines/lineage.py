"""Where a run's inputs came from: its datasets (MLflow dataset inputs) and its code (git).

Why here and not in the workers: both are facts about the submission. The shards are named by
their manifest (its content hash is the digest: the same shards copied elsewhere keep it), and
the code by the checkout the job was submitted from, which only the submitting side can see:
`ray job submit --working-dir` uploads a copy without `.git`. So the commit is read from git on
the driver when it runs in a checkout, else from `SAGAN_GIT_COMMIT` / `SAGAN_GIT_DIRTY`, which
`python -m pipelines.lineage --runtime-env` puts into a job's runtime env before the upload.

    python -m pipelines.lineage --runtime-env '{"excludes": ["/.git/"]}'   # JSON for ray job submit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.config import PipelineConfig

COMMIT_ENV, DIRTY_ENV = "SAGAN_GIT_COMMIT", "SAGAN_GIT_DIRTY"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type")
GIT_DIRTY_TAG = "sagan.git.dirty"
VERSION_TAG = "sagan.version"
REPO_ROOT = Path(__file__).resolve().parents[1]


class ShardDataset(MetaDataset):
    """A prepared shard set as an MLflow dataset: source = the shard prefix, digest = the
    manifest's content hash, profile = counts, classes and image size (shown in the UI)."""

    def __init__(self, manifest: Any, name: str):
        self._profile = {"images": manifest.total, "shards": len(manifest.shards),
                         "num_classes": manifest.num_classes,
                         "classes": ", ".join(manifest.class_names),
                         "image_size": manifest.image_size, "channels": manifest.channels,
                         "raw_source": manifest.source}
        with warnings.catch_warnings():  # local paths: "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(manifest.shard_base or manifest.location)
        super().__init__(source, name=name, digest=manifest.content_hash()[:16])

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _dataset_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def shard_dataset(path: str, endpoint_url: str | None = None, data_cfg: Any = None
                  ) -> ShardDataset:
    """The dataset at a shard prefix (local, s3://, http(s)://) or shard set (its index), from
    its manifest; `data_cfg` gives the index options of data.path."""
    from sagan.data import index_options, load_manifest

    m = load_manifest(path, endpoint_url=endpoint_url, **index_options(data_cfg))
    return ShardDataset(m, _dataset_name(path))


def run_datasets(cfg: PipelineConfig) -> dict[str, ShardDataset]:
    """context -> dataset of a training run: `training` (data.path) and, when the run
    evaluates, `evaluation` (eval.real_path, or data.path when unset)."""
    ep = cfg.data.endpoint_url
    out = {"training": shard_dataset(cfg.data.path, ep, cfg.data)}
    if cfg.eval.eval_every > 0:
        real = cfg.eval.real_path or cfg.data.path
        out["evaluation"] = out["training"] if real == cfg.data.path else shard_dataset(real, ep)
    return out


def log_datasets(client: MlflowClient, run_id: str, datasets: dict[str, ShardDataset]) -> None:
    """`mlflow.log_input` for each (context, dataset), through the client API."""
    client.log_inputs(run_id, [
        DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for context, ds in datasets.items()])


def record_lineage(cfg: PipelineConfig, uri: str, run_id: str) -> dict[str, ShardDataset]:
    """Log a run's datasets and code version from the driver (again on each re-submission: the
    tags then name the code that ran last); returns the datasets."""
    client = MlflowClient(uri)
    datasets = run_datasets(cfg)
    log_datasets(client, run_id, datasets)
    for key, value in code_version().items():
        client.set_tag(run_id, key, value)
    return datasets


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(cwd: Path = REPO_ROOT) -> dict[str, str]:
    """Tags naming the code of this run: git commit and dirty flag (from the environment a
    submitter set, else from git in `cwd`; absent when neither knows) and the sagan version."""
    try:
        tags = {VERSION_TAG: version("sagan")}
    except PackageNotFoundError:
        tags = {VERSION_TAG: "unknown"}
    if sys.argv and sys.argv[0].endswith(".py"):  # the script, as the run page's "Source"
        script = Path(sys.argv[0]).resolve()
        name = script.relative_to(REPO_ROOT) if script.is_relative_to(REPO_ROOT) else script
        tags.update(zip(SOURCE_TAGS, (name.as_posix(), "LOCAL"), strict=True))
    # Only a checkout rooted at `cwd` counts: a job's uploaded copy may sit inside another repo.
    in_checkout = _git("rev-parse", "--show-toplevel", cwd=cwd) == str(cwd.resolve())
    commit = os.environ.get(COMMIT_ENV) or (in_checkout and _git("rev-parse", "HEAD", cwd=cwd))
    if not commit:
        return tags
    dirty = os.environ.get(DIRTY_ENV) if os.environ.get(COMMIT_ENV) else None
    if dirty is None:
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
        dirty = "unknown" if status is None else str(bool(status)).lower()
    return {**tags, GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: dirty}


def runtime_env(base: dict[str, Any] | None = None, cwd: Path = REPO_ROOT) -> dict[str, Any]:
    """`base` (a Ray runtime env) with the checkout's commit and dirty flag in env_vars."""
    env = dict(base or {})
    tags = code_version(cwd)
    if GIT_COMMIT_TAG in tags:
        env["env_vars"] = {**env.get("env_vars", {}), COMMIT_ENV: tags[GIT_COMMIT_TAG],
                           DIRTY_ENV: tags[GIT_DIRTY_TAG]}
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Print the code version of this checkout, or a Ray runtime env carrying it "
                    "(for `ray job submit --runtime-env-json`, which uploads no .git).")
    p.add_argument("--runtime-env", nargs="?", const="{}", metavar="JSON",
                   help="print this runtime env JSON with SAGAN_GIT_COMMIT/SAGAN_GIT_DIRTY added")
    args = p.parse_args(argv)
    if args.runtime_env is None:
        print(json.dumps(code_version(), indent=1))
        return 0
    try:
        base = json.loads(args.runtime_env)
    except json.JSONDecodeError as exc:
        print(f"error: --runtime-env: not JSON ({exc})", file=sys.stderr)
        return 2
    print(json.dumps(runtime_env(base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
