"""Sample grids, attention maps/figures and the sample.py CLI, on tiny random-init models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sagan.config import load_config
from sagan.models import Generator
from sagan.visualize import (
    ATTENTION_META_KEY,
    GRID_META_KEY,
    VisualizationError,
    attention_figure,
    attention_maps,
    fixed_z,
    sample_grid,
    save_png,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.g_ch=8", "model.d_ch=8", "model.image_size=32", "model.g_attention=[16]",
        "model.d_attention=[]"]
QUERIES = [(8, 8), (20, 12), (31, 0)]


def tiny_generator(*extra: str) -> Generator:
    cfg = load_config(None, [*TINY, *extra])
    torch.manual_seed(0)
    G = Generator(cfg.model)
    # gamma starts at 0 (attention is a no-op at init); make it matter so maps shape the image.
    for layer in G.attention.values():
        layer.gamma.data.fill_(0.5)
    return G


def assert_distribution(w: torch.Tensor, dims: tuple[int, ...]) -> None:
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(dim=dims), torch.ones_like(w.sum(dim=dims)),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- attention maps


def test_attention_maps_at_16px_are_distributions_over_key_positions() -> None:
    G = tiny_generator()
    maps = attention_maps(G, QUERIES, seed=0)
    assert maps.rows == 1 and maps.cols == len(QUERIES)
    raw = maps.raw[16]
    assert raw.shape == (1, 16 * 16, 8 * 8)  # (heads, queries on 16x16, keys on pooled 8x8)
    assert_distribution(raw, dims=(-1,))
    assert [p.query for p in maps.panels] == QUERIES
    for p in maps.panels:
        assert p.layer == 16 and p.key_grid == (8, 8) and p.weights.shape == (8, 8)
        assert_distribution(p.weights, dims=(0, 1))
        assert_distribution(p.head_weights, dims=(1, 2))
        cy, cx = p.query_cell
        assert (cy, cx) == (p.query[0] // 2, p.query[1] // 2)  # 32 px image -> 16 px layer
        torch.testing.assert_close(p.weights.flatten(), raw[:, cy * 16 + cx].mean(0))
        assert p.upsampled.shape == (32, 32)
    # different query pixels really read different rows of the map
    assert not torch.allclose(maps.panels[0].weights, maps.panels[1].weights)


def test_attention_unpooled_and_multihead_maps_are_distributions() -> None:
    maps = attention_maps(tiny_generator("model.attention_pooled=false"), [(5, 5)])
    (p,) = maps.panels
    assert p.key_grid == (16, 16)
    assert_distribution(p.weights, dims=(0, 1))
    maps = attention_maps(tiny_generator("model.attention_heads=2"), [(5, 5)])
    (p,) = maps.panels
    assert p.head_weights.shape == (2, 8, 8)
    assert_distribution(p.head_weights, dims=(1, 2))
    assert_distribution(p.weights, dims=(0, 1))


def test_attention_png_has_one_panel_per_query_point(tmp_path: Path) -> None:
    G = tiny_generator()
    img, maps = attention_figure(G, QUERIES, seed=0, panel_px=120, return_maps=True)
    path = tmp_path / "attn.png"
    save_png(img, path)
    with Image.open(path) as saved:
        layout = json.loads(saved.text[ATTENTION_META_KEY])
        size = saved.size
    assert len(layout["panels"]) == len(QUERIES)
    assert [tuple(p["query"]) for p in layout["panels"]] == QUERIES
    assert {p["layer"] for p in layout["panels"]} == {16}
    assert (layout["rows"], layout["cols"]) == (1, 3)
    assert size == (3 * 120, 1 * 120)  # panels are exactly panel_px square
    assert len(maps.panels) == len(QUERIES)


def test_attention_figure_panel_per_query_and_layer() -> None:
    G = tiny_generator("model.g_attention=[8,16]")
    img = attention_figure(G, [(3, 3), (30, 30)], panel_px=100)
    layout = json.loads(img.info[ATTENTION_META_KEY])
    assert (layout["rows"], layout["cols"]) == (2, 2) and img.size == (200, 200)
    assert [(p["layer"], tuple(p["key_grid"])) for p in layout["panels"]] == [
        (8, (4, 4)), (8, (4, 4)), (16, (8, 8)), (16, (8, 8))]
    # the heat map is visible: panels are not just the plain image
    arr = np.asarray(img).astype(float)
    assert arr.std() > 10


def test_attention_bad_requests_are_clear_errors() -> None:
    G = tiny_generator()
    with pytest.raises(VisualizationError, match=r"\(32, 5\) is outside the 32x32"):
        attention_maps(G, [(32, 5)])
    with pytest.raises(VisualizationError, match="no attention layers"):
        attention_maps(tiny_generator("model.g_attention=[]"), [(1, 1)])
    with pytest.raises(VisualizationError, match=r"no generator attention at \[8\]"):
        attention_maps(G, [(1, 1)], layers=[8])


# --------------------------------------------------------------------------- sample grids


def test_sample_grid_conditional_one_row_per_class_fixed_z(tmp_path: Path) -> None:
    G = tiny_generator("model.num_classes=5").train()
    img = sample_grid(G, n_per_class=4, seed=0)
    meta = json.loads(img.info[GRID_META_KEY])
    assert (meta["rows"], meta["cols"], meta["classes"]) == (5, 4, [0, 1, 2, 3, 4])
    assert img.size == (4 * 34 + 2, 5 * 34 + 2)  # 32 px cells + 2 px padding
    assert G.training  # mode restored
    again = sample_grid(G, n_per_class=4, seed=0)
    assert np.array_equal(np.asarray(img), np.asarray(again))
    assert not np.array_equal(np.asarray(img), np.asarray(sample_grid(G, n_per_class=4, seed=1)))
    # cell (class 3, column 2) is exactly the sample attention figures use for those indices
    cell = np.asarray(img)[2 + 3 * 34: 2 + 3 * 34 + 32, 2 + 2 * 34: 2 + 2 * 34 + 32]
    x = attention_maps(G, [(0, 0)], seed=0, sample_index=2, class_id=3).image
    expect = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(cell.astype(int) - expect.astype(int)).max() <= 1
    save_png(img, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as saved:
        assert json.loads(saved.text[GRID_META_KEY])["rows"] == 5


def test_sample_grid_unconditional_and_greyscale() -> None:
    G = tiny_generator("model.num_classes=0", "model.channels=1")
    img = sample_grid(G, n=10, seed=0)
    meta = json.loads(img.info[GRID_META_KEY])
    assert (meta["rows"], meta["cols"]) == (3, 4) and img.mode == "RGB"
    arr = np.asarray(img)[2:34, 2:34]
    assert np.array_equal(arr[..., 0], arr[..., 2])  # grey repeated to RGB


def test_fixed_z_depends_only_on_seed_and_index() -> None:
    a = fixed_z(16, range(5), seed=0)
    torch.testing.assert_close(fixed_z(16, [3], seed=0)[0], a[3], rtol=0, atol=0)
    assert not torch.equal(fixed_z(16, [3], seed=1)[0], a[3])


# --------------------------------------------------------------------------- sample.py


def _checkpoint(tmp_path: Path, *extra: str) -> Path:
    from sagan.checkpoint import save_checkpoint
    from sagan.training import GANTrainer

    return save_checkpoint(tmp_path / "ckpt.pt", GANTrainer(load_config(None, [*TINY, *extra])))


def test_sample_cli_bad_inputs_exit_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines import sample

    ckpt = str(_checkpoint(tmp_path))
    out = str(tmp_path / "g.png")
    cases = [
        (["--model", str(tmp_path / "nope.pt"), "--out", out], "nope.pt"),
        (["--model", ckpt, "--out", out, "--attention-out", str(tmp_path / "a.png"),
          "--query", "40,2"], "(40, 2) is outside"),
        (["--model", ckpt, "--out", out, "--classes", "0,99"], "class_ids"),
    ]
    for argv, needle in cases:
        assert sample.main([*argv, "--device", "cpu", "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as info:  # argparse: malformed --query
        sample.parse_args(["--model", ckpt, "--out", out, "--query", "8"])
    assert info.value.code == 2


@pytest.mark.slow
def test_sample_cli_writes_grid_and_attention_pngs(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "model.num_classes=3")
    grid, attn = tmp_path / "grid.png", tmp_path / "attn.png"
    cmd = [sys.executable, "pipelines/sample.py", "--model", str(ckpt), "--out", str(grid),
           "--attention-out", str(attn), "--query", "8,8", "--query", "20,12", "--seed", "1",
           "--n-per-class", "4", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(grid) as g:
        assert json.loads(g.text[GRID_META_KEY])["rows"] == 3
    with Image.open(attn) as a:
        assert len(json.loads(a.text[ATTENTION_META_KEY])["panels"]) == 2


@pytest.mark.slow
def test_load_generator_any_plain_pickled_mlflow_model(tmp_path: Path) -> None:
    """A model saved with plain mlflow.pytorch (a pickled Generator with .cfg, spectral norm
    baked into the weights since parametrized modules cannot be pickled) loads too."""
    import mlflow.pytorch
    from torch.nn.utils import parametrize

    from pipelines.model_io import load_generator_any

    G = tiny_generator().eval()
    # Not a deepcopy of G: removing parametrizations from a deepcopy deletes the `weight`
    # property from the parametrized class the original shares (torch behaviour).
    baked = tiny_generator().eval()
    for m in baked.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    mlflow.pytorch.save_model(baked, str(tmp_path / "model"), serialization_format="pickle")
    loaded = load_generator_any(str(tmp_path / "model"), "cpu")
    assert loaded.model_cfg == G.cfg and not loaded.generator.training
    a = np.asarray(sample_grid(loaded.generator, n_per_class=2, seed=0)).astype(int)
    b = np.asarray(sample_grid(G, n_per_class=2, seed=0)).astype(int)
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_sample_cli_from_registered_model_alias(tmp_path: Path) -> None:
    """models:/NAME@latest logged by pipelines/registry.py -> sample.py grid + attention."""
    from pipelines.registry import log_generator

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        run_id = run.info.run_id
    G = tiny_generator("model.num_classes=3")
    log_generator(uri, run_id, G.state_dict(), G.cfg, "tiny-gen", fid=1.0)
    grid, attn = tmp_path / "grid.png", tmp_path / "attn.png"
    cmd = [sys.executable, "pipelines/sample.py", "--model", "models:/tiny-gen@champion",
           "--tracking-uri", uri, "--out", str(grid), "--attention-out", str(attn),
           "--n-per-class", "2", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(attn) as a:
        assert len(json.loads(a.text[ATTENTION_META_KEY])["panels"]) == 4  # default queries
    from sagan.layers import refresh_spectral_norm

    refresh_spectral_norm(G)  # the registry loader refreshes SN vectors; do the same here
    want = np.asarray(sample_grid(G, n_per_class=2, seed=0)).astype(int)
    with Image.open(grid) as g:
        assert np.abs(np.asarray(g.convert("RGB")).astype(int) - want).max() <= 1
