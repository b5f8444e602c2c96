"""The learning-rate schedule of G and D: constant, then (`train.lr_decay`) linear to 0.

Why: at the quickstart's high constant rate G keeps jittering from step to step; annealing over
the end of a run is the usual remedy (measured in docs/RESULTS.md: no gain at 1,500 steps, part
of the 8,000-step run that reached FID 43.5). torch's `LambdaLR` does the bookkeeping; the
factor is a pure function of the train step, so a checkpoint without scheduler state (written
before the schedule existed) resumes on it from its step.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def decay_factor(step: int, steps: int, fraction: float) -> float:
    """1 until the last `fraction` of `steps`, then linearly to 0 at `steps` (0 = constant)."""
    start = steps * (1.0 - fraction)
    if fraction <= 0 or step < start:
        return 1.0
    return max(0.0, (steps - step) / (steps - start))


def make_schedulers(optimizers: list[torch.optim.Optimizer], steps: int,
                    fraction: float) -> list[LambdaLR]:
    """One scheduler per optimizer; step them once per train step."""
    factor = partial(decay_factor, steps=steps, fraction=fraction)
    return [LambdaLR(opt, factor) for opt in optimizers]


def restore_schedulers(schedulers: list[LambdaLR], saved: list[dict] | None, step: int) -> None:
    """Load saved scheduler states (or, when None, the state at `step`) and set the optimizers'
    rates to match."""
    if saved is None:
        saved = [{**s.state_dict(), "last_epoch": step,
                  "_last_lr": [lr * s.lr_lambdas[0](step) for lr in s.base_lrs]}
                 for s in schedulers]
    for scheduler, state in zip(schedulers, saved, strict=True):
        scheduler.load_state_dict(state)
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                             strict=True):
            group["lr"] = lr
