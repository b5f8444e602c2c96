"""What the training loop needs from whoever runs it: rank, world size, device, and where
reports and checkpoints go.

Two runners exist: a Ray Train worker (`Session.for_ray_train`, inside a TorchTrainer) and a
Ray Tune trial that trains in-process (`Session.for_tune_trial`, one worker, where the
`ray.train.*` session functions raise). The loop takes one as an argument instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Session:
    rank: int
    world_size: int
    device: torch.device
    _report: Callable[..., None]
    _get_checkpoint: Callable[[], Any]
    _checkpoint_cls: Any
    node: str = ""  # the Ray node id this worker runs on (progress lines, per-node metrics)

    @classmethod
    def for_ray_train(cls) -> Session:
        """In a Ray Train worker: its world rank and size, the device Ray assigned."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                   ray.train.report, ray.train.get_checkpoint, ray.train.Checkpoint,
                   node=ray.get_runtime_context().get_node_id())

    @classmethod
    def for_tune_trial(cls) -> Session:
        """In a Tune trial that trains in-process: rank 0 of 1, its GPU if it has one."""
        import ray.tune

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, device, ray.tune.report, ray.tune.get_checkpoint, ray.tune.Checkpoint,
                   node=ray.get_runtime_context().get_node_id())

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report `metrics` (and the checkpoint in `checkpoint_dir`, uploaded to the run's
        storage). Under Ray Train every rank must report at the same steps."""
        checkpoint = self._checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir \
            else None
        self._report(metrics, checkpoint=checkpoint)

    def get_checkpoint(self) -> Any | None:
        """The run's latest registered checkpoint (a Ray Checkpoint), or None on a fresh run."""
        return self._get_checkpoint()
