"""What the driver checks before any cluster work: local paths, the data, the cluster's room.

Every failure is a `PreflightError` whose message is one line naming the field; the entry
points print it as `error: ...` and exit with code 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig


class PreflightError(RuntimeError):
    """Something that would make the cluster job fail; reported before any cluster work."""


# --------------------------------------------------------------------------- local paths

# Config fields that may name a local file or directory. Ray Train V2 runs each worker in the
# run's own directory, not where the command was run, so a relative path there names another
# place (issue 17); the driver makes them absolute before the config reaches any worker.
LOCAL_PATH_FIELDS = ("data.path", "data.index", "data.prepare_source", "cluster.storage_path",
                     "eval.real_path", "eval.cache_dir", "eval.inception_weights")


def _is_local(value: str) -> bool:
    return "://" not in value


def absolute(value: str, cwd: Path) -> tuple[str, bool]:
    """(absolute form, whether `value` was relative); `~` expands, URLs pass unchanged."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif not _is_local(value):
        return value, False
    path = Path(value).expanduser()
    return str((cwd / path).resolve() if not path.is_absolute() else path), \
        not path.is_absolute()


def source_absolute(spec: str, cwd: Path) -> tuple[str, bool]:
    """`KIND:PATH` prepare-source spec with PATH made absolute (`fashion-mnist` has none)."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        return spec, False
    path, relative = absolute(path, cwd)
    return f"{kind}:{path}", relative


def localize_paths(cfg: PipelineConfig, cwd: Path | None = None
                   ) -> tuple[PipelineConfig, list[tuple[str, str]]]:
    """(a copy of `cfg` whose local paths are absolute, the dotted fields that were relative).

    Relative paths are taken relative to `cwd` (default: the directory the command runs in),
    which is where a user expects `data/fashion-mnist-32` to be. The eval paths of a run that
    never evaluates (eval.eval_every 0) are made absolute but not reported: nothing reads them."""
    cwd = Path(cwd or Path.cwd()).resolve()
    out = copy.deepcopy(cfg)
    relative: list[tuple[str, str]] = []
    evaluates = cfg.eval.eval_every > 0
    for dotted in LOCAL_PATH_FIELDS:
        section, name = dotted.split(".")
        value = getattr(getattr(out, section), name)
        if not value:
            continue
        fix = source_absolute if name == "prepare_source" else absolute
        new, was_relative = fix(str(value), cwd)
        setattr(getattr(out, section), name, new)
        if was_relative and (evaluates or section != "eval"):
            relative.append((dotted, str(value)))
    return out, relative


def absolute_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """An MLflow URI whose local store (sqlite:///path, file:path, a bare path) is absolute:
    rank 0 logs from its own working directory, where a relative store is somewhere else."""
    cwd = Path(cwd or Path.cwd()).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return uri if path.startswith("/") else f"sqlite:///{cwd / path}"
    if uri.startswith("file:"):
        path = uri[len("file:"):].removeprefix("//")
        return uri if path.startswith("/") else Path(cwd / path).as_uri()
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return str(cwd / Path(uri).expanduser())
    return uri


def refuse_relative_on_many_nodes(relative: list[tuple[str, str]], nodes: int) -> None:
    """A path that was relative names a different place on every node of a multi-node
    cluster (and usually nothing at all on the others): refuse it up front."""
    if relative and nodes > 1:
        field, value = relative[0]
        raise PreflightError(
            f"{field} '{value}' is a relative local path and the Ray cluster has {nodes} nodes: "
            "it would name a different place on each; use s3://, or an absolute path on "
            "storage that every node mounts")


def refuse_local_storage_on_many_nodes(cfg: PipelineConfig, nodes: int) -> None:
    """Checkpoints are written by rank 0 and read back by every rank of the next worker group,
    wherever Ray places them: on several nodes they must live where every node sees them."""
    c = cfg.cluster
    if nodes > 1 and _is_local(c.storage_path) and not c.shared_storage:
        raise PreflightError(
            f"cluster.storage_path '{c.storage_path}' is node-local and the Ray cluster has "
            f"{nodes} nodes: a worker restarted on another node would not find the "
            "checkpoints; use s3://, or set cluster.shared_storage=true if every node mounts it")


# --------------------------------------------------------------------------- data


def ensure_data(cfg: PipelineConfig) -> Any:
    """The manifest of cfg.data.path, after checking it (and eval.real_path, the held-out set
    FID is measured against, when evaluation is on) fits the model. A missing local dataset is
    prepared from `data.prepare_source` on first use (the embedded default): the train split
    at data.path, the test split at eval.real_path."""
    manifest = _ensure_one(cfg, "data.path", cfg.data.path, "train")
    if cfg.eval.real_path and cfg.eval.eval_every > 0:
        _ensure_one(cfg, "eval.real_path", cfg.eval.real_path, "test")
    return manifest


def _ensure_one(cfg: PipelineConfig, field: str, path: str, split: str) -> Any:
    from sagan.data import DataError, NotIndexed, ensure_dataset

    source = cfg.data.prepare_source
    if "://" not in path and not (Path(path) / "manifest.json").is_file() and source \
            and not Path(path).is_dir():
        print(f"preparing {source} ({split} split) shards in {path} (first use) ...", flush=True)
    try:
        try:
            manifest = ensure_dataset(cfg.data, cfg.model.image_size, cfg.model.channels,
                                      path=path, split=split)
        except NotIndexed as missing:
            manifest = _index_first_use(cfg, field, missing)
    except DataError as exc:  # SourceError included
        raise PreflightError(f"{field} '{path}': {exc}") from None
    if manifest.total == 0 or not manifest.shards:
        raise PreflightError(f"{field} '{path}': the manifest lists no samples")
    m = cfg.model
    if manifest.is_index:
        _check_index_labels(field, path, manifest, cfg)
        return manifest.bind(m.image_size, m.channels, cfg.data.fit, m.num_classes)
    if manifest.image_size != m.image_size or manifest.channels != m.channels:
        raise PreflightError(
            f"{field} '{path}': shards are {manifest.image_size}px x {manifest.channels}ch but "
            f"model.image_size={m.image_size}, model.channels={m.channels}")
    if manifest.num_classes != m.num_classes:
        raise PreflightError(
            f"{field} '{path}': shards have {manifest.num_classes} classes but "
            f"model.num_classes={m.num_classes} (set model.num_classes={manifest.num_classes})")
    return manifest


def _index_first_use(cfg: PipelineConfig, field: str, missing: Any) -> Any:
    """Shards the ecosystem wrote, not indexed yet: index them now as Ray tasks (once; later
    runs read the index where it was written)."""
    from pipelines.index_data import index_shards, summary
    from sagan.data import DataError

    d = cfg.data
    print(f"{field}: no index of {missing.spec} yet: indexing it (once; later runs reuse "
          f"{missing.location}) ...", flush=True)
    try:
        m = index_shards(missing.spec, missing.location, d.image_key, d.label, d.endpoint_url)
    except DataError as exc:
        hint = "" if d.index else "; for a read-only bucket set data.index to a writable prefix"
        raise DataError(f"{exc}{hint}") from None
    print(summary(m), flush=True)
    return m


def _check_index_labels(field: str, path: str, manifest: Any, cfg: PipelineConfig) -> None:
    """An index's labels against model.num_classes: none with a conditional model, or a label
    the model has no class for (named with its shard), stop here; num_classes 0 trains
    unconditionally on any shards."""
    n, idx, label = cfg.model.num_classes, manifest.index, cfg.data.label
    if n == 0:
        return
    if manifest.num_classes == 0:
        raise PreflightError(
            f"{field} '{path}': the shards have no label ({label or 'data.label is none'}: "
            f"their keys are {', '.join(idx.get('keys', {}))}) but model.num_classes={n}; set "
            "data.label (cls or json:FIELD) or model.num_classes=0 (unconditional)")
    for shard, (_, hi) in idx.get("label_range", {}).items():
        if hi >= n:
            raise PreflightError(f"{field} '{path}': label {hi} in shard {shard} is outside "
                                 f"model.num_classes={n} (labels must be in [0, {n}))")
    if manifest.num_classes > n:
        raise PreflightError(
            f"{field} '{path}': the shards have {manifest.num_classes} classes "
            f"({', '.join(manifest.class_names[:5])}, ...) but model.num_classes={n}")


# --------------------------------------------------------------------------- cluster


def check_resources(cfg: PipelineConfig, allow_autoscale: bool) -> None:
    """Refuse up front when the cluster cannot place the workers (saying what is free)."""
    import ray

    from pipelines.ray_cluster import placeable_workers

    c = cfg.cluster
    n = c.min_workers  # an elastic run starts with what fits, at least min
    need = {"CPU": n * c.cpus_per_worker, "GPU": n * c.gpus_per_worker}
    total, free = ray.cluster_resources(), ray.available_resources()
    short = [r for r, k in need.items() if k > 0 and total.get(r, 0) < k]
    if short and not allow_autoscale:
        raise PreflightError(
            f"cluster.workers={c.workers} x (CPU {c.cpus_per_worker}, GPU {c.gpus_per_worker}) "
            f"needs CPU {need['CPU']:g}, GPU {need['GPU']:g}; the cluster has CPU "
            f"{total.get('CPU', 0):g} (free {free.get('CPU', 0):g}), GPU {total.get('GPU', 0):g} "
            f"(free {free.get('GPU', 0):g}). Lower --workers, or pass --allow-autoscale on an "
            "autoscaling cluster")
    fits, nodes = placeable_workers(c.cpus_per_worker, c.gpus_per_worker, c.placement)
    if fits < n and not allow_autoscale:
        raise PreflightError(
            f"cluster.workers={c.workers} with cluster.placement={c.placement} needs {n} "
            f"worker(s) of CPU {c.cpus_per_worker:g}, GPU {c.gpus_per_worker:g}, but the {nodes} "
            f"node(s) of the cluster hold {fits}; lower --workers or use another placement")
