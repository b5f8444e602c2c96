"""The per-worker Ray Train loop: build the trainer, restore, stream shards, step, report.

Every rank calls `ray.train.report` at exactly the same steps (checkpoint steps, eval steps and
the last step: pure functions of the step counter), as Train V2 requires; only rank 0 attaches
a checkpoint, logs to MLflow, draws samples and computes FID.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sagan.checkpoint import CheckpointError, load_checkpoint, restore_trainer, save_checkpoint
from sagan.config import Config, config_from_dict
from sagan.prefetch import Prefetcher
from sagan.training import GANTrainer, NonFiniteLossError, to_floats

CHECKPOINT_FILE = "checkpoint.pt"
# Key of the dict the loop returns (rank 0's reaches the driver as `Result.return_value`) when
# training stopped on a non-finite loss.
STOPPED_KEY = "stopped"


def _report_fn():
    """ray.tune.report inside a Tune trial that runs in-process, else ray.train.report."""
    if os.environ.get("SAGAN_TUNE_INPROCESS") == "1":
        import ray.tune

        return ray.tune.report, ray.tune.get_checkpoint, ray.tune.Checkpoint
    import ray.train

    return ray.train.report, ray.train.get_checkpoint, ray.train.Checkpoint


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


def _context() -> tuple[int, int, torch.device]:
    if os.environ.get("SAGAN_TUNE_INPROCESS") == "1":
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def _newest_loadable(ckpt: Any, checkpoint_cls: Any, device: torch.device, rank: int
                     ) -> tuple[dict, str]:
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
            state = load(checkpoint_cls(path=path, filesystem=ckpt.filesystem))
        except CheckpointError:
            continue
        _say(f"[rank {rank}] latest checkpoint {latest} is unusable ({first_error}); "
             f"falling back to {path}")
        return state, path
    raise first_error


def _rank0_outputs(cfg: Config, trainer: GANTrainer, logger: Any, device: torch.device,
                   step: int, values: dict[str, float], *, do_log: bool, do_sample: bool,
                   do_eval: bool) -> None:
    """Rank 0's outputs at `step`: the progress line, the EMA sample grid, FID/IS/KID (added to
    `values`, which the caller then reports to Ray) and the MLflow metrics."""
    t = cfg.train
    if do_log:
        _say(f"step {step}/{t.steps} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    if do_sample or do_eval:
        G_ema = trainer.ema_generator()
    if do_sample and logger is not None:
        from sagan.visualize import sample_grid

        logger.log_image(sample_grid(G_ema, seed=0, device=device),
                         f"samples/step_{step:07d}.png")
    if do_eval:
        from sagan.eval import compute_metrics

        values.update(compute_metrics(G_ema, cfg.eval, real=cfg.data.path, device=device,
                                      num_classes=cfg.model.num_classes,
                                      endpoint_url=cfg.data.endpoint_url))
    if logger is not None and (do_log or do_eval):
        logger.log_metrics(values, step)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point run by every Ray Train worker (also called in-process by Tune trials).
    Returns None, or `{STOPPED_KEY: message, "step": n}` when a non-finite loss stopped it."""
    from sagan.data import load_manifest, train_loader

    cfg: Config = config_from_dict(loop_config["config"])
    t = cfg.train
    report, get_checkpoint, Checkpoint = _report_fn()
    rank, world, device = _context()
    if device.type == "cpu" and t.cpus_per_worker >= 1:
        torch.set_num_threads(int(t.cpus_per_worker))
    trainer = GANTrainer(cfg, device=device, rank=rank)

    ckpt = get_checkpoint()
    if ckpt is not None:
        state, path = _newest_loadable(ckpt, Checkpoint, device, rank)
        restore_trainer(trainer, state, where=f"checkpoint {path}")
        _say(f"[rank {rank}] resumed from {path} at step {trainer.step}")

    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    per_rank = t.batch_size // world
    per_epoch = max(1, manifest.total // t.batch_size)
    loader = train_loader(cfg.data, per_rank, rank=rank, world_size=world,
                          batches_per_epoch=per_epoch * t.ndis, seed=t.seed + trainer.step,
                          manifest=manifest)
    stream = _batches(loader)
    # batches staged ahead on the device (copy and layout change overlap the previous step)
    staged = (Prefetcher(stream, device, depth=cfg.data.prefetch,
                         memory_format=trainer.memory_format)
              if cfg.data.prefetch > 0 else contextlib.nullcontext(stream))

    logger = None
    if rank == 0 and loop_config.get("tracking_uri") and loop_config.get("run_id"):
        from pipelines.tracking import RunLogger

        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"])

    with staged as batches:
        last_time, last_step = time.perf_counter(), trainer.step
        while trainer.step < t.steps:
            try:
                metrics = trainer.train_step(batches)
            except NonFiniteLossError as exc:
                if os.environ.get("SAGAN_TUNE_INPROCESS") == "1":
                    raise  # a Tune trial: let Tune mark it errored
                # Not a worker failure: FailureConfig would replay the same step from the same
                # checkpoint max_failures times and then fail with a traceback. The finiteness flag
                # is all-reduced, so every rank stops here at the same step with no collective
                # pending; the driver turns rank 0's return value into one clear error.
                if rank == 0:
                    _say(f"[rank 0] {exc}")
                return {STOPPED_KEY: str(exc), "step": trainer.step}
            step = trainer.step
            do_log = _every(step, t.log_every, t.steps)
            do_ckpt = _every(step, t.ckpt_every, t.steps)
            do_eval = cfg.eval.eval_every > 0 and _every(step, cfg.eval.eval_every, t.steps)
            do_sample = t.sample_every > 0 and _every(step, t.sample_every, t.steps)
            if not (do_log or do_ckpt or do_eval or do_sample):
                continue
            values = to_floats(metrics)
            now = time.perf_counter()
            elapsed = max(now - last_time, 1e-9)
            values["img_per_s"] = (step - last_step) * t.batch_size * t.ndis / elapsed
            last_time, last_step = now, step
            stats = loader.stats
            values.update(skipped_samples=stats.skipped_samples,
                          skipped_shards=stats.skipped_shards, data_retries=stats.retries,
                          skipped_steps=trainer.skipped_steps)
            if rank == 0:
                _rank0_outputs(cfg, trainer, logger, device, step, values,
                               do_log=do_log, do_sample=do_sample, do_eval=do_eval)
            if not (do_ckpt or do_eval):
                continue
            values["step"] = step
            if do_ckpt and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer)
                    report(values, checkpoint=Checkpoint.from_directory(tmp))
            else:
                report(values)
