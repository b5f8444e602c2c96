"""Sample grids and self-attention maps of a Generator, as PNG-ready PIL images.

    grid = sample_grid(G, n_per_class=8, seed=0)              # one row per class (conditional)
    fig = attention_figure(G, query_points=[(8, 8), (20, 12)], seed=0)
    save_png(fig, "attention.png")                            # layout kept in PNG metadata

Why fixed per-sample z and what a panel shows: docs/EVALUATION.md ("sample.py").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import nn

from sagan.models import unwrap

GRID_META_KEY = "sagan_grid"
ATTENTION_META_KEY = "sagan_attention_layout"


class VisualizationError(ValueError):
    """A bad visualisation request (query outside the image, model without attention...)."""


# --------------------------------------------------------------------------- helpers


def fixed_z(z_dim: int, indices: Sequence[int], seed: int = 0,
            truncation: float | None = None) -> torch.Tensor:
    """z for sample indices: z_i depends only on (seed, i, truncation), never on how many are
    drawn; `truncation` t redraws entries with |z| > t (`sagan.eval.generate.truncate`)."""
    from sagan.eval.generate import truncate

    rows = []
    for i in indices:
        s = int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, dtype=np.uint64)[0])
        z = torch.randn(1, z_dim, generator=torch.Generator().manual_seed(s))
        rows.append(truncate(z, truncation, s % 2**62))
    return torch.cat(rows) if rows else torch.empty(0, z_dim)


@torch.no_grad()
def _generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None, device: torch.device,
              batch_size: int = 64, return_attention: bool = False):
    """Run G in eval mode over (z, y) in batches; restores G's train/eval mode afterwards."""
    was_training = G.training
    G.eval()
    try:
        images, maps = [], []
        for s in range(0, z.shape[0], batch_size):
            zb = z[s:s + batch_size].to(device)
            yb = None if y is None else y[s:s + batch_size].to(device)
            if return_attention:
                x, m = G(zb, yb, return_attention=True)
                maps.append({r: v.float().cpu() for r, v in m.items()})
            else:
                x = G(zb, yb)
            images.append(x.float().cpu())
    finally:
        G.train(was_training)
    x = torch.cat(images)
    if not return_attention:
        return x
    merged = {r: torch.cat([m[r] for m in maps]) for r in maps[0]} if maps else {}
    return x, merged


def _to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> RGB or L PIL image."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Save as PNG, keeping string entries of `img.info` (our layout metadata) as text chunks."""
    info = PngImagePlugin.PngInfo()
    for k, v in img.info.items():
        if isinstance(v, str):
            info.add_text(k, v)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path, format="PNG", pnginfo=info)


# --------------------------------------------------------------------------- sample grids


def sample_grid(G: nn.Module, n_per_class: int | None = None, n: int = 64, seed: int = 0,
                device: str | torch.device = "cpu", class_ids: Sequence[int] | None = None,
                padding: int = 2, batch_size: int = 64,
                truncation: float | None = None) -> Image.Image:
    """A grid of samples from fixed z (see `fixed_z`; `truncation` t: BigGAN's trick).

    Conditional G: one row per class (`class_ids`, default all), `n_per_class` columns (default
    8), column j using z_j in every row. Unconditional G: `n` samples in a near-square grid.
    The layout is in `img.info['sagan_grid']` (JSON).
    """
    from torchvision.utils import make_grid

    G = unwrap(G)
    device = torch.device(device)
    k = int(G.num_classes)
    if k > 0:
        cols = 8 if n_per_class is None else int(n_per_class)
        classes = list(range(k)) if class_ids is None else [int(c) for c in class_ids]
        bad = [c for c in classes if not 0 <= c < k]
        if bad or not classes or cols < 1:
            raise VisualizationError(f"sample_grid: class_ids must be in [0, {k}) and "
                                     f"n_per_class >= 1 (got class_ids={bad or classes}, "
                                     f"n_per_class={cols})")
        zc = fixed_z(G.z_dim, range(cols), seed, truncation)
        z = zc.repeat(len(classes), 1)
        y = torch.tensor(classes).repeat_interleave(cols)
        nrow, rows = cols, len(classes)
    else:
        if n < 1:
            raise VisualizationError(f"sample_grid: n must be >= 1, got {n}")
        z = fixed_z(G.z_dim, range(n), seed, truncation)
        y, classes = None, []
        nrow = int(math.ceil(math.sqrt(n)))
        rows = int(math.ceil(n / nrow))
    x = _generate(G, z, y, device, batch_size)
    grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=padding, pad_value=1.0)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, "RGB")
    img.info[GRID_META_KEY] = json.dumps({"rows": rows, "cols": nrow, "classes": classes,
                                          "seed": seed, "image_size": int(x.shape[-1]),
                                          "truncation": truncation})
    return img


# --------------------------------------------------------------------------- attention maps


def quarter_points(size: int) -> list[tuple[int, int]]:
    """The default query pixels (y, x): the four quarter points of a size x size image, one in
    each quadrant, so a figure shows both local and long-range attention."""
    q1, q3 = size // 4, 3 * size // 4
    return [(q1, q1), (q1, q3), (q3, q1), (q3, q3)]


@dataclass
class AttentionPanel:
    """The attention of one query pixel in one attention layer."""

    query: tuple[int, int]  # (y, x) in image pixels
    layer: int  # feature-map resolution of the attention layer
    query_cell: tuple[int, int]  # (y, x) of the query on that layer's grid
    key_grid: tuple[int, int]  # (H_k, W_k): pooled layers attend over a half-resolution grid
    weights: torch.Tensor  # (H_k, W_k), mean over heads: a probability distribution
    head_weights: torch.Tensor  # (heads, H_k, W_k), each a probability distribution
    upsampled: torch.Tensor  # (S, S) weights resized to the image, for display


@dataclass
class AttentionMaps:
    """Everything `attention_figure` draws, for checking or custom plots."""

    image: torch.Tensor  # (C, S, S) in [-1, 1]
    class_id: int | None
    raw: dict[int, torch.Tensor]  # resolution -> (heads, N queries, M keys) of this sample
    panels: list[AttentionPanel] = field(default_factory=list)
    rows: int = 0  # one row per attention layer
    cols: int = 0  # one column per query point

    def layout(self) -> dict:
        return {"rows": self.rows, "cols": self.cols,
                "panels": [{"query": list(p.query), "layer": p.layer,
                            "key_grid": list(p.key_grid)} for p in self.panels]}


def attention_maps(G: nn.Module, query_points: Sequence[tuple[int, int]], seed: int = 0,
                   sample_index: int = 0, device: str | torch.device = "cpu",
                   class_id: int | None = None, layers: Sequence[int] | None = None
                   ) -> AttentionMaps:
    """Attention distributions of `query_points` ((y, x) image pixels) for one sample.

    The sample is z_{sample_index} of `seed` with class `class_id` (default 0 when conditional):
    grid cell (class_id, sample_index) of `sample_grid`. A query pixel maps to the layer cell
    that covers it (y * r // S); its row of the softmax map is reshaped to the key grid.
    """
    G = unwrap(G)
    device = torch.device(device)
    if not query_points:
        raise VisualizationError("attention_maps: give at least one query point (y, x)")
    z = fixed_z(G.z_dim, [sample_index], seed)
    y = None
    if G.num_classes > 0:
        class_id = 0 if class_id is None else int(class_id)
        if not 0 <= class_id < G.num_classes:
            raise VisualizationError(f"attention_maps: class_id {class_id} not in "
                                     f"[0, {G.num_classes})")
        y = torch.tensor([class_id])
    else:
        class_id = None
    x, maps = _generate(G, z, y, device, return_attention=True)
    if not maps:
        raise VisualizationError("attention_maps: this generator has no attention layers "
                                 "(model.g_attention is empty)")
    if layers is not None:
        missing = [r for r in layers if r not in maps]
        if missing:
            raise VisualizationError(f"attention_maps: no generator attention at {missing}; "
                                     f"available: {sorted(maps)}")
        maps = {r: maps[r] for r in layers}
    size = x.shape[-1]
    raw = {r: m[0] for r, m in sorted(maps.items())}
    out = AttentionMaps(image=x[0], class_id=class_id, raw=raw, rows=len(raw),
                        cols=len(query_points))
    for qy, qx in query_points:
        if not (0 <= int(qy) < size and 0 <= int(qx) < size):
            raise VisualizationError(f"query point ({qy}, {qx}) is outside the {size}x{size} "
                                     "image (give y,x pixel coordinates)")
    for r, m in raw.items():  # panels row-major: one row per layer, one column per query
        for qy, qx in query_points:
            qy, qx = int(qy), int(qx)
            heads, n_q, n_k = m.shape
            side_k = math.isqrt(n_k)
            if r * r != n_q or side_k * side_k != n_k:
                raise VisualizationError(f"attention layer {r}: map shape {tuple(m.shape)} is "
                                         "not (heads, r*r, k*k)")
            cy, cx = qy * r // size, qx * r // size
            hw = m[:, cy * r + cx].reshape(heads, side_k, side_k)
            w = hw.mean(dim=0)
            up = F.interpolate(w[None, None], size=(size, size), mode="bilinear",
                               align_corners=False)[0, 0]
            out.panels.append(AttentionPanel((qy, qx), r, (cy, cx), (side_k, side_k), w, hw, up))
    return out


def render_attention(maps: AttentionMaps, panel_px: int = 200, alpha: float = 0.55,
                     cmap: str = "inferno") -> Image.Image:
    """Draw `maps` as a (layers x query points) panel grid; layout in `img.info`.

    Each panel is exactly `panel_px` square, so the PNG is (cols * panel_px, rows * panel_px).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(maps.cols * panel_px / dpi, maps.rows * panel_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    img = ((maps.image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    grey = img.shape[2] == 1
    for i, p in enumerate(maps.panels):
        ax = fig.add_axes((
            (i % maps.cols) / maps.cols + 0.02 / maps.cols,
            1 - (i // maps.cols + 1) / maps.rows + 0.02 / maps.rows,
            0.96 / maps.cols, 0.86 / maps.rows))
        ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1,
                  interpolation="nearest")
        # Min-max stretch: shows where this query looks *relatively* most; the title gives the
        # peak weight relative to uniform attention, so near-uniform maps are not mistaken
        # for sharp ones.
        heat = p.upsampled.numpy()
        lo, hi = float(heat.min()), float(heat.max())
        ax.imshow((heat - lo) / max(hi - lo, 1e-12), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                  interpolation="bilinear")
        peak = float(p.weights.max()) * p.weights.numel()
        ax.plot([p.query[1]], [p.query[0]], marker="o", markersize=7, markerfacecolor="none",
                markeredgecolor="cyan", markeredgewidth=2)
        ax.plot([p.query[1]], [p.query[0]], marker="+", markersize=7, color="cyan")
        ax.set_title(f"attn{p.layer} q=({p.query[0]},{p.query[1]}) peak {peak:.1f}x uniform",
                     fontsize=7, pad=2)
        ax.set_axis_off()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    out = Image.fromarray(rgba[..., :3].copy(), "RGB")
    out.info[ATTENTION_META_KEY] = json.dumps(maps.layout())
    return out


def attention_figure(G: nn.Module, query_points: Sequence[tuple[int, int]], seed: int = 0,
                     sample_index: int = 0, device: str | torch.device = "cpu",
                     class_id: int | None = None, layers: Sequence[int] | None = None,
                     panel_px: int = 200, return_maps: bool = False
                     ) -> Image.Image | tuple[Image.Image, AttentionMaps]:
    """SAGAN-fig.-1-style figure: one panel per (query point, attention layer).

    Returns the PIL image (layout JSON in `img.info['sagan_attention_layout']`), or
    `(image, AttentionMaps)` with `return_maps=True`.
    """
    maps = attention_maps(G, query_points, seed, sample_index, device, class_id, layers)
    img = render_attention(maps, panel_px=panel_px)
    return (img, maps) if return_maps else img
