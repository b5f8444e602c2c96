"""The training loop every worker runs: build the trainer, restore, stream shards, step, report.

It runs under a `Session` (pipelines/session.py): a Ray Train worker or an in-process Tune trial.
Every rank reports at exactly the same steps (checkpoint steps, eval steps and the last step:
pure functions of the step counter), as Train V2 requires, and every rank takes part in each
evaluation (`evaluate`); rank 0 attaches the checkpoint, logs to MLflow and draws samples.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.config import PipelineConfig, run_config_from_dict
from pipelines.ray_cluster import wait_for_storage
from pipelines.session import Session
from sagan.checkpoint import CheckpointError, load_checkpoint, restore_trainer, save_checkpoint
from sagan.prefetch import Prefetcher
from sagan.training import GANTrainer, NonFiniteLossError, to_floats

CHECKPOINT_FILE = "checkpoint.pt"
# Keys of the dict the loop returns (rank 0's reaches the driver as `Result.return_value`) when
# training stopped for a reason a retry would meet again: the one-line message, and the exit
# code it maps to (2: the input is wrong, a non-fitting checkpoint included; 3: training
# diverged). Ray Train V2 retries every worker error up to FailureConfig.max_failures and has
# no hook for "this one is final", so such errors end the loop normally instead of raising.
STOPPED_KEY = "stopped"
EXIT_KEY = "exit_code"


def _say(message: str) -> None:
    """One progress line. Train V2 patches print() and tees it when a library has wrapped
    sys.stdout (MLflow does), which prints every line twice; the raw stream does not."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def _every(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _batches(loader: Any) -> Iterator:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("data loader produced no batches (all shards unreadable?)")


def _newest_loadable(ckpt: Any, device: torch.device, rank: int) -> tuple[dict, str]:
    """(state, path) of Ray's latest checkpoint or, when its file is missing or unreadable,
    of the newest older sibling `checkpoint_*` directory whose file loads.

    Why: pyarrow's S3 upload (Ray Train's checkpoint persistence) can lose a failed part upload
    without raising ("Error ignored when destroying file"), so Ray may register a checkpoint
    whose checkpoint.pt never arrived. Resuming from it would fail on every retry and every
    re-submission; the previous checkpoint is intact, so resume from that instead. Only a file
    that does not load is skipped: a checkpoint that loads but does not fit the model is a
    config error and raises from `restore_trainer`."""
    import posixpath

    from pyarrow import fs as pafs

    def load(c: Any) -> dict:
        with c.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_FILE, device)

    try:
        return load(ckpt), ckpt.path
    except CheckpointError as exc:
        first_error = exc
    latest = ckpt.path.rstrip("/")
    parent, name = posixpath.dirname(latest), posixpath.basename(latest)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    # Ray names checkpoint directories checkpoint_<timestamp>: name order is time order.
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name),
                   reverse=True)
    for candidate in older:
        path = posixpath.join(parent, candidate)
        try:
            state = load(type(ckpt)(path=path, filesystem=ckpt.filesystem))
        except CheckpointError:
            continue
        _say(f"[rank {rank}] latest checkpoint {latest} is unusable ({first_error}); "
             f"falling back to {path}")
        return state, path
    raise first_error


def _agree(error: str | None) -> str | None:
    """The first rank's setup error, as seen by every rank (one all-gather). Every rank must
    stop together: a rank that went on would wait forever in its first collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _setup_error(exc: BaseException, cfg: PipelineConfig) -> str | None:
    """The one-line message of a setup failure that every retry would meet again (bad config,
    missing or invalid data, a checkpoint that does not fit the model), else None: storage
    outages and anything unexpected stay ordinary worker failures, which Ray Train retries."""
    from sagan.config import ConfigError
    from sagan.data import DataError, StorageUnreachable

    if isinstance(exc, StorageUnreachable) or not isinstance(
            exc, ConfigError | DataError | CheckpointError):
        return None
    return f"data.path '{cfg.data.path}': {exc}" if isinstance(exc, DataError) else str(exc)


def evaluate(session: Session, cfg: PipelineConfig, G: torch.nn.Module
             ) -> tuple[dict[str, float], dict[str, str]]:
    """The eval.metrics of the EMA generator `G` (default FID + KID) against the held-out
    images at eval.real_path (data.path when unset), and the protocol they were measured under.
    Every rank calls it at every eval step: each generates and featurises its share, rank 0
    scores and every rank gets the result."""
    from sagan.eval import evaluate_generator

    t0 = time.perf_counter()
    result = evaluate_generator(G, cfg.eval, real=cfg.eval.real_path or cfg.data.path,
                                device=session.device, num_classes=cfg.model.num_classes,
                                endpoint_url=cfg.data.endpoint_url, seed=cfg.train.seed)
    # training stops this long
    return {**result.scores, "eval_seconds": time.perf_counter() - t0}, result.protocol


def _progress(step: int, total: int, values: dict[str, float], rate: float) -> str:
    """`step 120/1000 (12%) 35.1 img/s ETA 4m10s loss_d=... ...`: `rate` is steps per second
    since this session started (evaluations included), so the ETA is wall-clock time."""
    eta = (total - step) / rate if rate > 0 else float("inf")
    when = ("?" if eta == float("inf") else
            f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m" if eta >= 3600 else
            f"{int(eta // 60)}m{int(eta % 60):02d}s")
    rest = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "img_per_s")
    return (f"step {step}/{total} ({100 * step // max(total, 1)}%) "
            f"{values.get('img_per_s', 0.0):.1f} img/s ETA {when} {rest}")


def _log_figures(cfg: PipelineConfig, G: torch.nn.Module, logger: Any, device: torch.device,
                 step: int) -> None:
    """The EMA generator `G`'s sample grid (key `samples`) and, per attention layer, where a few
    fixed query pixels of its first sample attend (key `attention/<layer>`, as in the paper's
    figure 1), from fixed z: the UI's step slider shows the same images evolving."""
    from sagan.visualize import attention_figure, quarter_points, sample_grid

    logger.log_image(sample_grid(G, seed=0, device=device), "samples", step)
    queries = quarter_points(cfg.model.image_size)
    for r in sorted(cfg.model.g_attention):
        logger.log_image(attention_figure(G, queries, seed=0, device=device, layers=[r]),
                         f"attention/{r}", step)


def _publish(cfg: PipelineConfig, G: torch.nn.Module | None, logger: Any, device: torch.device,
             step: int, values: dict[str, float], rate: float, *, do_log: bool,
             do_sample: bool, do_eval: bool) -> None:
    """Rank 0's outputs at `step`: the progress line, the EMA figures and, at log and eval
    steps, the MLflow metrics (`values`, evaluation results included)."""
    if do_log:
        _say(_progress(step, cfg.train.steps, values, rate))
    if logger is None:
        return
    if do_sample and G is not None:
        _log_figures(cfg, G, logger, device, step)
    if do_log or do_eval:
        logger.log_metrics(values, step)


def _node_of(session: Session) -> tuple[bool, int, bool]:
    """(first rank on its node, index of its node, the ranks span several nodes), from the Ray
    node ids of all ranks (one all-gather). Not Ray Train's local/node ranks: those group
    workers by IP address, which makes the raylets of one host (`up --nodes N`) one node."""
    import torch.distributed as dist

    if session.world_size == 1 or not dist.is_initialized():
        return True, 0, False
    ids: list[Any] = [None] * session.world_size
    dist.all_gather_object(ids, session.node)
    nodes = list(dict.fromkeys(ids))  # in rank order
    return ids.index(session.node) == session.rank, nodes.index(session.node), len(nodes) > 1


@contextlib.contextmanager
def _system_metrics(session: Session, cfg: PipelineConfig, tracking_uri: str | None,
                    run_id: str | None) -> Iterator[None]:
    """MLflow's system-metrics monitor in the first worker of each node, while training runs;
    a node id per node (`system/node<k>/...`) when the workers span several."""
    every = cfg.tracking.system_metrics_every
    if not (tracking_uri and run_id and every > 0):  # the same on every rank
        yield
        return
    first, index, several = _node_of(session)  # a collective: every rank gets here
    if not first:
        yield
        return
    from pipelines.tracking import system_metrics

    monitor = system_metrics(tracking_uri, run_id, every,
                             node_id=f"node{index}" if several else None)
    try:
        yield
    finally:
        # finish() flushes through MLflow's blocking client: bounded, so a server that is down
        # at the end cannot hold the worker (its samples are the only thing it can cost)
        stopper = threading.Thread(target=monitor.finish, daemon=True)
        stopper.start()
        stopper.join(10.0)


@contextlib.contextmanager
def _closing(logger: Any, wait_s: float) -> Iterator[None]:
    """Drain rank 0's tracking queue when the loop ends, waiting at most `wait_s` for MLflow
    (what is left stays in the spill file; the queue prints how to send it). When the loop
    raises, only briefly: Ray Train's restart should not wait on the tracking server, and the
    restarted rank 0 replays the spill file (on the same node)."""
    try:
        yield
    except BaseException:
        if logger is not None:
            logger.close(min(wait_s, 5.0))
        raise
    if logger is not None:
        logger.close(wait_s)


def _quiet_report_dumps() -> None:
    """Drop Ray Train's `Reporting training result N: TrainingReport(...)` INFO line, which
    prints every metric dict from every rank at every report. Ray has no setting for it:
    `RunConfig(logging_config=LoggingConfig(log_level=...))` governs the `ray.train` loggers
    only, and this one is named after its file (ray/train/v2/_internal/execution/context.py).
    Its warnings and errors still show."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's entry point on every worker: `run_loop` under a Ray Train session."""
    _quiet_report_dumps()
    return run_loop(Session.for_ray_train(), run_config_from_dict(loop_config["config"]),
                    loop_config.get("tracking_uri"), loop_config.get("run_id"))


def run_loop(session: Session, cfg: PipelineConfig, tracking_uri: str | None = None,
             run_id: str | None = None) -> dict[str, Any] | None:
    """Train to cfg.train.steps under `session`, logging to the MLflow run `run_id` (rank 0).
    Returns None, or `{STOPPED_KEY: message, EXIT_KEY: code, "step": n}` when training stopped
    for good: a setup error every retry would meet again, or a non-finite loss."""
    from sagan.data import index_options, load_manifest, train_loader

    t, rank, device = cfg.train, session.rank, session.device
    if device.type == "cpu" and cfg.cluster.cpus_per_worker >= 1:
        torch.set_num_threads(int(cfg.cluster.cpus_per_worker))
    trainer = GANTrainer(cfg, device=device, rank=rank)
    _say(f"[rank {rank}] started: {session.world_size} worker(s), {device}, node "
         f"{session.node or '-'}, batch {t.batch_size // session.world_size} of {t.batch_size}")

    error = None
    try:
        ckpt = session.get_checkpoint()
        if ckpt is not None:
            state, path = _newest_loadable(ckpt, device, rank)
            restore_trainer(trainer, state, where=f"checkpoint {path}")
            _say(f"[rank {rank}] resumed from {path} at step {trainer.step}")
        m = cfg.model
        manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url,
                                 **index_options(cfg.data)).bind(
            m.image_size, m.channels, cfg.data.fit, m.num_classes)
    except Exception as exc:
        error = _setup_error(exc, cfg)
        if error is None:
            raise
    error = _agree(error)
    if error is not None:
        return {STOPPED_KEY: error, EXIT_KEY: 2, "step": trainer.step}

    world = session.world_size
    per_epoch = max(1, manifest.total // t.batch_size)
    loader = train_loader(cfg.data, t.batch_size // world, rank=rank, world_size=world,
                          batches_per_epoch=per_epoch * t.ndis, seed=t.seed + trainer.step,
                          manifest=manifest)
    stream = _batches(loader)
    # batches staged ahead on the device (copy and layout change overlap the previous step)
    staged = (Prefetcher(stream, device, depth=cfg.data.prefetch,
                         memory_format=trainer.memory_format)
              if cfg.data.prefetch > 0 else contextlib.nullcontext(stream))

    logger = None
    if rank == 0 and tracking_uri and run_id:
        from pipelines.tracking_queue import TrackingQueue

        # metrics and images go through a queue: the step loop never waits on MLflow
        logger = TrackingQueue(tracking_uri, run_id, cfg.tracking.spill_dir or
                               Path(tempfile.gettempdir()) / "sagan-mlflow-spill",
                               max_images=cfg.tracking.max_queued_images)

    with staged as batches, _system_metrics(session, cfg, tracking_uri, run_id), \
            _closing(logger, cfg.tracking.wait_s):
        last_time, last_step = time.perf_counter(), trainer.step
        start_time, start_step = last_time, last_step
        while trainer.step < t.steps:
            try:
                metrics = trainer.train_step(batches)
            except NonFiniteLossError as exc:
                # Not a worker failure: FailureConfig would replay the same step from the same
                # checkpoint max_failures times and then fail with a traceback. The finiteness flag
                # is all-reduced, so every rank stops here at the same step with no collective
                # pending; the driver turns rank 0's return value into one clear error.
                if rank == 0:
                    _say(f"[rank 0] {exc}")
                return {STOPPED_KEY: str(exc), EXIT_KEY: 3, "step": trainer.step}
            step = trainer.step
            do_log = _every(step, t.log_every, t.steps)
            do_ckpt = _every(step, t.ckpt_every, t.steps)
            do_eval = cfg.eval.eval_every > 0 and _every(step, cfg.eval.eval_every, t.steps)
            do_sample = t.sample_every > 0 and _every(step, t.sample_every, t.steps)
            if not (do_log or do_ckpt or do_eval or do_sample):
                continue
            now = time.perf_counter()
            stats = loader.stats
            values = {**to_floats(metrics),
                      "img_per_s": (step - last_step) * t.batch_size * t.ndis
                      / max(now - last_time, 1e-9),
                      "skipped_samples": stats.skipped_samples,
                      "skipped_shards": stats.skipped_shards, "data_retries": stats.retries,
                      "skipped_steps": trainer.skipped_steps}
            last_time, last_step = now, step
            # the EMA generator (a copy with settled SN estimates) is built once per step
            G = trainer.ema_generator() if do_eval or (do_sample and rank == 0) else None
            if do_eval:
                scores, protocol = evaluate(session, cfg, G)
                values.update(scores)
                if logger is not None:  # rank 0: the protocol as run tags (registry reads them)
                    logger.set_tags(protocol)
            if rank == 0 and (do_log or do_sample or do_eval):
                rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                _publish(cfg, G, logger, device, step, values, rate, do_log=do_log,
                         do_sample=do_sample, do_eval=do_eval)
            if not (do_ckpt or do_eval):
                continue
            values["step"] = step
            if do_ckpt and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer)
                    wait_for_storage(cfg.cluster.storage_path, cfg.cluster.storage_wait_s,
                                     f"the step-{step} checkpoint", lambda m: _say(f"[rank 0] {m}"))
                    session.report(values, checkpoint_dir=tmp)
            else:
                session.report(values)
    _say(f"[rank {rank}] finished step {trainer.step}: G/D/EMA sha256 {_weights_digest(trainer)}")
    return None


def _weights_digest(trainer: GANTrainer) -> str:
    """sha256 over G, D and the EMA copy (parameters and buffers): equal on every rank of a
    healthy data-parallel run, so the last line of each rank shows it (and tests compare it)."""
    import hashlib

    h = hashlib.sha256()
    for net in (trainer.G_raw, trainer.D_raw, trainer.ema.module):
        for name, value in net.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                     .tobytes())
    return h.hexdigest()[:16]
