"""One SAGAN training step (ndis D steps + one G step), EMA generator, bf16 autocast.

Works in one process and under DDP (ARCHITECTURE.md §4):
- the D step is ONE forward of D over cat(real, fake): D is never called twice before a backward,
  so DDP never sees in-place buffer updates (SN power-iteration vectors) between two forwards;
- the G step calls the *unwrapped* D with its parameters frozen: D gets no gradient and its DDP
  reducer is never involved, so D's gradients are all-reduced exactly once per D step;
- G's BatchNorm running statistics are averaged over ranks after every G step, so G, D and the EMA
  copy (parameters *and* buffers) stay bit-identical across ranks;
- the same seed builds the same init on every rank; noise comes from a per-rank torch.Generator.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sagan.config import Config
from sagan.layers import refresh_spectral_norm
from sagan.losses import get_losses
from sagan.models import Discriminator, Generator, attention_layers

Batch = tuple[torch.Tensor, torch.Tensor | None]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; the message names the step (train.nan_policy=stop)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _adam(params, lr: float, betas: tuple[float, float], device: torch.device):
    """Adam with the fused kernel where torch has one for this device (CUDA, CPU), else foreach."""
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


class GANTrainer:
    """Owns G, D, the EMA generator, both optimizers, the noise RNG and the step counter.

    `train_step(batches)` pulls `ndis` real batches from the iterator, runs ndis D steps and one G
    step, updates the EMA, and returns a dict of *detached tensors* (no host sync inside the step;
    call `to_floats` at log time).
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", rank: int = 0,
                 distributed: bool | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.device = torch.device(device)
        self.rank = rank
        self.distributed = _distributed() if distributed is None else distributed
        torch.manual_seed(self.t.seed)  # identical initial weights on every rank
        G, D = Generator(cfg.model).to(self.device), Discriminator(cfg.model).to(self.device)
        self.memory_format = (torch.channels_last if self.t.channels_last
                              else torch.contiguous_format)
        G, D = G.to(memory_format=self.memory_format), D.to(memory_format=self.memory_format)
        self.G_raw, self.D_raw = G, D
        self.ema = AveragedModel(G, multi_avg_fn=get_ema_multi_avg_fn(self.t.ema_decay),
                                 use_buffers=False)
        self.ema.requires_grad_(False)
        betas = (self.t.beta1, self.t.beta2)
        self.opt_g = _adam(G.parameters(), self.t.lr_g, betas, self.device)
        self.opt_d = _adam(D.parameters(), self.t.lr_d, betas, self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            G = DDP(G, device_ids=ids)
            D = DDP(D, device_ids=ids)
        if self.t.compile:
            G, D = _maybe_compile(G), _maybe_compile(D)
        self.G, self.D = G, D
        self.d_loss_fn, self.g_loss_fn = get_losses(self.t.loss)
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(self.t.seed * 1_000_003 + 7919 * (rank + 1))
        self.step = 0
        self.skipped_steps = 0
        self._d_trainable = [p for p in D.parameters() if p.requires_grad]
        self._attn = attention_layers(self.G_raw, self.D_raw)
        amp = self.t.amp
        self.amp = amp == "bf16" or (amp == "auto" and self.device.type == "cuda")

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.G_raw.sample_inputs(n, generator=self.noise, device=self.device)

    def _finite_or_handle(self, loss: torch.Tensor, name: str) -> bool:
        """True if `loss` is finite on every rank. One collective, so all ranks agree and none
        hangs in a backward the others skipped. This scalar sync is deliberate: a NaN that
        reaches Adam's moments poisons the weights for good."""
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            return True
        if self.t.nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {name} at step {self.step + 1}: stopping (train.nan_policy=stop); "
                "the last saved checkpoint is intact — lower the learning rates or set "
                "train.nan_policy=skip")
        self.skipped_steps += 1
        return False

    def _to_device(self, x: torch.Tensor, y: torch.Tensor | None) -> Batch:
        x = x.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
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
            fake = self.G_raw(z, y_fake).to(memory_format=self.memory_format)
        x = torch.cat([real, fake.to(real.dtype)])
        y = torch.cat([y_real, y_fake]) if y_real is not None else None
        with self.autocast():
            logits = self.D(x, y).float()
        d_real, d_fake = logits[:b], logits[b:]
        loss = self.d_loss_fn(d_real, d_fake)
        out = {"loss_d": loss.detach(), "d_real": d_real.detach().mean(),
               "d_fake": d_fake.detach().mean()}
        if not self._finite_or_handle(loss, "loss_d"):
            return out
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return out

    def g_step(self, batch_size: int) -> dict[str, torch.Tensor]:
        """One generator update through a frozen, unwrapped D (D receives no gradient)."""
        for p in self._d_trainable:
            p.requires_grad_(False)
        try:
            z, y = self._sample(batch_size)
            with self.autocast():
                fake = self.G(z, y)
                logits = self.D_raw(fake.to(memory_format=self.memory_format), y).float()
            loss = self.g_loss_fn(logits)
            if self._finite_or_handle(loss, "loss_g"):
                self.opt_g.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_g.step()
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
        for _ in range(self.t.ndis):
            x, y = next(batches)
            batch_size = x.shape[0]
            d_metrics = self.d_step(x, y)
        metrics = {**d_metrics, **self.g_step(batch_size)}
        for name, layer in self._attn.items():
            metrics[f"gamma/{name}"] = layer.gamma.detach()[0]
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ EMA / buffers
    def _sync_bn_stats(self) -> None:
        """Average G's BatchNorm running stats over ranks (they differ: per-rank batches)."""
        if not self.distributed:
            return
        bufs = [b for n, b in self.G_raw.named_buffers()
                if n.endswith(("running_mean", "running_var"))]
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
        """EMA of G's parameters (swa_utils); buffers (BN stats, SN u/v) copied from G, as in
        StudioGAN. Before `ema_start` the EMA simply tracks G (n_averaged reset => copy)."""
        if self.step < self.t.ema_start:
            self.ema.n_averaged.zero_()
        self.ema.update_parameters(self.G_raw)
        for b_ema, b in zip(self.ema.module.buffers(), self.G_raw.buffers(), strict=True):
            b_ema.copy_(b)

    def ema_generator(self, power_iterations: int = 20) -> Generator:
        """An eval-mode copy of the EMA generator for sampling/evaluation/export.

        Its spectral-norm vectors are refreshed by extra power iterations on the *EMA* weights
        (the copied u/v were estimated for G's current weights, not the average's)."""
        G = copy.deepcopy(self.ema.module)
        refresh_spectral_norm(G, power_iterations)
        return G.eval()

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
            "G_ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.G_raw.load_state_dict(state["G"])
        self.D_raw.load_state_dict(state["D"])
        self.ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.noise.set_state(rng["noise"].to(self.noise.get_state().device))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _maybe_compile(module: nn.Module) -> nn.Module:
    """torch.compile when it works here; otherwise warn and keep eager (train.compile)."""
    try:
        return torch.compile(module)
    except Exception as exc:  # noqa: BLE001 - compile support varies by platform/version
        import warnings

        warnings.warn(f"train.compile: torch.compile unavailable ({exc}); running eager",
                      stacklevel=2)
        return module


def to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Host-side floats for logging (the one place a sync happens)."""
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
