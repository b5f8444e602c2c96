"""One SAGAN training step (ndis D steps + one G step), the EMA generator, bf16 autocast.

`GANTrainer` runs in one process and under DDP; how it keeps ranks bit-identical (one D forward
over cat(real, fake), the G step through the unwrapped frozen D, BatchNorm statistics averaged
over ranks) and what makes it fast (one host sync per step, sync-free EMA, channels_last, fused
resampling) is explained in docs/ARCHITECTURE.md ("The training step") and docs/PERFORMANCE.md.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sagan.config import Config
from sagan.diffaugment import diff_augment
from sagan.layers import refresh_spectral_norm, set_channels_last, set_fused_resampling
from sagan.losses import get_losses
from sagan.lr_schedule import make_schedulers, restore_schedulers
from sagan.models import Discriminator, Generator, attention_layers
from sagan.precision import bf16_autocast, uses_bf16

Batch = tuple[torch.Tensor, torch.Tensor | None]
# BatchNorm buffers that a forward pass updates: averaged over ranks (mean, var) after each G
# step, restored when nan_policy=skip drops a step
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

# Keyword arguments for torch.compile (train.compile=true); tests choose the backend.
COMPILE_OPTIONS: dict[str, Any] = {}


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; the message names the step (train.nan_policy=stop)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _adam(params, lr: float, betas: tuple[float, float],
          device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has one for this device (CUDA, CPU), else foreach.

    Fused matters twice: one kernel per parameter group instead of ~10 elementwise passes, and
    `found_inf` support, which lets a non-finite loss skip the update without a host sync."""
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


class GANTrainer:
    """Owns G, D, the EMA generator, both optimizers, the noise RNG and the step counter.

    `train_step(batches)` pulls `ndis` real batches from the iterator, runs ndis D steps and one G
    step, updates the EMA, and returns a dict of *detached tensors*. The only host sync inside is
    the finiteness check of the step's losses (one per `train_step`; see `_resolve_flags`); call
    `to_floats` at log time.
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", rank: int = 0,
                 distributed: bool | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.device = torch.device(device)
        self.rank = rank
        self.distributed = _distributed() if distributed is None else distributed
        if self.device.type == "cuda":
            # fixed shapes every step: let cuDNN pick the fastest conv algorithms once
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(self.t.seed)  # identical initial weights on every rank
        G, D = Generator(cfg.model).to(self.device), Discriminator(cfg.model).to(self.device)
        self.memory_format = (torch.channels_last if self.t.channels_last
                              else torch.contiguous_format)
        for net in (G, D):
            set_channels_last(net, self.t.channels_last)
            set_fused_resampling(net, self.t.fuse_resampling)
        self.G_raw, self.D_raw = G, D
        self.ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(self.t.ema_decay),
                                 use_buffers=False)
        self.ema.requires_grad_(False)
        betas = (self.t.beta1, self.t.beta2)
        self.opt_g = _adam(G.parameters(), self.t.lr_g, betas, self.device)
        self.opt_d = _adam(D.parameters(), self.t.lr_d, betas, self.device)
        # constant rates, or linear decay to 0 over the last `lr_decay` (sagan/lr_schedule.py)
        self.schedulers = make_schedulers([self.opt_g, self.opt_d], self.t.steps,
                                          self.t.lr_decay)
        # device-side skip of non-finite updates needs fused Adam's found_inf; else sync per loss
        self._deferred_check = all(opt.defaults.get("fused") for opt in (self.opt_g, self.opt_d))
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            G = DDP(G, device_ids=ids)
            D = DDP(D, device_ids=ids)
        # G/D (DDP-wrapped when distributed) for the updates; plain G samples the D step's
        # fakes and the frozen plain D scores the G step, so neither touches a DDP reducer
        self.G, self.D, self._G_sample, self._D_frozen = self._compiled(G, D, self.G_raw,
                                                                        self.D_raw)
        self.d_loss_fn, self.g_loss_fn = get_losses(self.t.loss)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(self.t.seed * 1_000_003 + 7919 * (rank + 1))
        self.step = 0
        self.skipped_steps = 0
        self._ema_cache: tuple[int, Generator] | None = None  # (step, ema_generator())
        self._d_trainable = [p for p in self.D_raw.parameters() if p.requires_grad]
        self._attn = attention_layers(self.G_raw, self.D_raw)
        self._flags: list[tuple[str, torch.Tensor]] | None = None  # pending finiteness flags
        self.amp = uses_bf16(self.t.amp, self.device)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        return bf16_autocast(self.amp, self.device)

    def _sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.G_raw.sample_inputs(n, generator=self.noise, device=self.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """DiffAugment (train.diffaugment) of D's input, drawn from this rank's noise stream."""
        return diff_augment(x, self.t.diffaugment, self.noise) if self.t.diffaugment else x

    def _finite_flag(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 if `loss` is finite on every rank, else 0.0, as a device tensor (no host sync).
        The MIN all-reduce makes all ranks agree, so none skips an update the others apply."""
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok

    def _handle_nonfinite(self, name: str) -> None:
        if self.t.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {name} at step {self.step + 1}: stopping (train.nan_policy=stop); "
                "the last saved checkpoint is intact — lower the learning rates or set "
                "train.nan_policy=skip")
        self.skipped_steps += 1

    def _finite_or_handle(self, loss: torch.Tensor, name: str) -> bool:
        """True if `loss` is finite on every rank (immediate host sync). Used only when the
        optimizers are not fused (no device-side skip); a NaN that reaches Adam's moments
        poisons the weights for good, so the update must not run."""
        if bool(self._finite_flag(loss).item()):
            return True
        self._handle_nonfinite(name)
        return False

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, name: str) -> None:
        """zero_grad, backward, optimizer step — skipped on the device if `loss` is not finite.

        Deferred mode: the flag is computed now and read back later (`_resolve_flags`), while
        fused Adam's `found_inf` leaves parameters, moments and step count untouched for a bad
        loss. Every rank runs the same backward either way, so DDP never hangs."""
        if not self._deferred_check:
            if self._finite_or_handle(loss, name):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return
        ok = self._finite_flag(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.found_inf = (1.0 - ok).reshape(())
        try:
            opt.step()
        finally:
            del opt.found_inf
        if self._flags is not None:
            self._flags.append((name, ok))
        else:  # d_step/g_step called on their own: resolve now
            self._resolve_flags([(name, ok)])

    def _resolve_flags(self, flags: list[tuple[str, torch.Tensor]]) -> None:
        """The step's one host sync: read all finiteness flags at once, then raise or count."""
        if not flags:
            return
        values = torch.cat([ok for _, ok in flags]).tolist()
        for (name, _), ok in zip(flags, values, strict=True):
            if ok < 1.0:
                self._handle_nonfinite(name)

    def _bn_stats(self, net: nn.Module) -> list[torch.Tensor]:
        """The BatchNorm running statistics (mean, var, batch count) of G or its EMA copy."""
        return [b for n, b in net.named_buffers() if n.endswith(_BN_STATS)]

    def _restore_bn_stats(self, saved: list[torch.Tensor]) -> None:
        """Undo a skipped step's BatchNorm statistics update, in G and in the EMA copy.

        Why: the forward pass updates the running statistics itself, so with
        `nan_policy=skip` a step whose activations overflowed would leave NaN/Inf in them even
        though every optimizer update was dropped, and the EMA generator (which copies G's
        buffers) would sample NaN images from then on."""
        torch._foreach_copy_(self._bn_stats(self.G_raw), saved)
        torch._foreach_copy_(self._bn_stats(self.ema.module), saved)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor | None) -> Batch:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if y is not None:
            y = y.to(self.device, non_blocking=True)
        if self.cfg.model.num_classes > 0 and y is None:
            raise ValueError("conditional model (model.num_classes > 0) got a batch without labels")
        return x, (y if self.cfg.model.num_classes > 0 else None)

    # ------------------------------------------------------------------ steps
    def d_step(self, real: torch.Tensor, y_real: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One discriminator update on a real batch and an equally large fake batch."""
        real, y_real = self._to_device(real, y_real)
        b = real.shape[0]
        with torch.no_grad(), self.autocast():
            z, y_fake = self._sample(b)
            fake = self._G_sample(z, y_fake)
        x = self._augment(torch.cat([real, fake.to(real.dtype)]))
        x = x.contiguous(memory_format=self.memory_format)
        y = torch.cat([y_real, y_fake]) if y_real is not None else None
        with self.autocast():
            logits = self.D(x, y).float()
        d_real, d_fake = logits[:b], logits[b:]
        loss = self.d_loss_fn(d_real, d_fake)
        out = {"loss_d": loss.detach(), "d_real": d_real.detach().mean(),
               "d_fake": d_fake.detach().mean()}
        self._update(self.opt_d, loss, "loss_d")
        return out

    def g_step(self, batch_size: int) -> dict[str, torch.Tensor]:
        """One generator update through a frozen, unwrapped D (D receives no gradient)."""
        for p in self._d_trainable:
            p.requires_grad_(False)
        try:
            z, y = self._sample(batch_size)
            with self.autocast():
                fake = self._augment(self.G(z, y))
                logits = self._D_frozen(fake.contiguous(memory_format=self.memory_format),
                                        y).float()
            loss = self.g_loss_fn(logits)
            self._update(self.opt_g, loss, "loss_g")
        finally:
            for p in self._d_trainable:
                p.requires_grad_(True)
        self._sync_bn_stats()
        self._update_ema()
        return {"loss_g": loss.detach()}

    def train_step(self, batches: Iterator[Batch]) -> dict[str, torch.Tensor]:
        """ndis D steps (each on the next real batch) then one G step; returns detached tensors."""
        d_metrics: dict[str, torch.Tensor] = {}
        batch_size = 0
        # a skipped step must leave no trace in G's BatchNorm statistics either (a few KB)
        bn_before = ([b.clone() for b in self._bn_stats(self.G_raw)]
                     if self.t.nan_policy == "skip" else None)
        skipped_before = self.skipped_steps
        self._flags = []
        try:
            for _ in range(self.t.ndis):
                x, y = next(batches)
                batch_size = x.shape[0]
                d_metrics = self.d_step(x, y)
            metrics = {**d_metrics, **self.g_step(batch_size)}
            flags = self._flags
        finally:
            self._flags = None
        self._resolve_flags(flags)
        if bn_before is not None and self.skipped_steps > skipped_before:
            self._restore_bn_stats(bn_before)
        for name, layer in self._attn.items():
            metrics[f"gamma/{name}"] = layer.gamma.detach()[0]
        self.step += 1
        for scheduler in self.schedulers:
            scheduler.step()
        return metrics

    # ------------------------------------------------------------------ torch.compile
    def _compiled(self, *modules: nn.Module) -> tuple[nn.Module, ...]:
        """(G, D, G for sampling, D for the G step), each through torch.compile when
        train.compile is set (one compiled module per distinct network). No eager fallback: a
        compile error, at the first call or the first backward, stops training with torch's
        own error (compile measured no gain on CPU, docs/PERFORMANCE.md; set it on GPUs)."""
        if not self.t.compile:
            return modules
        compiled: dict[int, nn.Module] = {}
        return tuple(compiled.setdefault(id(m), torch.compile(m, **COMPILE_OPTIONS))
                     for m in modules)

    # ------------------------------------------------------------------ EMA / buffers
    def _sync_bn_stats(self) -> None:
        """Average G's BatchNorm running stats over ranks (they differ: per-rank batches)."""
        if not self.distributed:
            return
        bufs = [b for b in self._bn_stats(self.G_raw) if b.is_floating_point()]  # not counts
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of G's parameters; buffers (BN stats, SN u/v) copied from G, as in StudioGAN.
        Before `ema_start` (and at the first step) the EMA simply tracks G (a copy).

        The arithmetic of `AveragedModel.update_parameters` with the EMA multi_avg_fn (copy, or
        `_foreach_lerp_(ema, G, 1 - decay)`; `n_averaged += 1`), with the copy/average choice
        taken from the step counter: AveragedModel takes it from `n_averaged`, a device tensor,
        which costs a device->host read per step."""
        ema_params = list(self.ema.module.parameters())
        g_params = [p.detach() for p in self.G_raw.parameters()]
        if self.step < self.t.ema_start or self.step == 0:
            torch._foreach_copy_(ema_params, g_params)
            self.ema.n_averaged.fill_(1)
        else:
            torch._foreach_lerp_(ema_params, g_params, 1.0 - self.t.ema_decay)
            self.ema.n_averaged += 1
        torch._foreach_copy_(list(self.ema.module.buffers()), list(self.G_raw.buffers()))

    def ema_generator(self, power_iterations: int = 20) -> Generator:
        """An eval-mode copy of the EMA generator for sampling/evaluation/export.

        Its spectral-norm vectors are refreshed by extra power iterations on the *EMA* weights
        (the copied u/v were estimated for G's current weights, not the average's), and its BN
        statistics are standing statistics of the EMA weights (`train.ema_standing_samples`).
        Built once per step (evaluation, sample grid and checkpoint share it): do not modify."""
        if self._ema_cache is not None and self._ema_cache[0] == self.step:
            return self._ema_cache[1]
        G = copy.deepcopy(self.ema.module)
        set_channels_last(G, False)
        refresh_spectral_norm(G, power_iterations)
        if self.t.ema_standing_samples:
            G.standing_statistics(self.t.ema_standing_samples, seed=self.t.seed)
        self._ema_cache = (self.step, G.eval())
        return G

    def _ema_state(self) -> dict:
        """The EMA's state dict with the BN statistics `ema_generator` samples with, so that a
        generator loaded from a checkpoint (`sagan.checkpoint.load_generator`, the registry)
        draws exactly what was evaluated. The live EMA keeps tracking G's buffers."""
        state = self.ema.state_dict()
        if self.t.ema_standing_samples:
            stats = {f"module.{name}": buf.detach().clone()
                     for name, buf in self.ema_generator().named_buffers()
                     if name.endswith(_BN_STATS)}
            # a diverged G (weights that overflow when run) measures inf/NaN statistics: keep
            # the finite running ones then, so the last checkpoint before a NaN stays clean
            if all(torch.isfinite(v).all() for v in stats.values()):
                state.update(stats)
        return state

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "G": self.G_raw.state_dict(),
            "D": self.D_raw.state_dict(),
            "G_ema": self._ema_state(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.G_raw.load_state_dict(state["G"])
        self.D_raw.load_state_dict(state["D"])
        self.ema.load_state_dict(state["G_ema"])
        self._ema_cache = None
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # absent in checkpoints from before train.lr_decay: the step sets the rate
        restore_schedulers(self.schedulers, state.get("schedulers"), int(state["step"]))
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.noise.set_state(rng["noise"].to(self.noise.get_state().device))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Host-side floats for logging (the one place a sync happens)."""
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
