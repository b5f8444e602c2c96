"""Issue 29: the truncation trick, request checking and PNG rendering shared by both servers, and
the pyfunc logged beside the pt2 graph (no service: a sqlite MLflow store in tmp_path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.png_model import (
    RequestError,
    SampleRequest,
    grid_png,
    parse_requests,
    render_pngs,
)
from sagan.truncation import truncated_z
from tests.test_visualize import tiny_generator


def test_truncated_z_stays_inside_and_repeats_by_seed():
    g = torch.Generator().manual_seed(3)
    z = truncated_z(64, 128, 0.5, g)
    assert z.shape == (64, 128) and float(z.abs().max()) <= 0.5
    # resampled, not clamped: almost no entry sits on the bound
    assert float((z.abs() > 0.499).float().mean()) < 0.01
    again = truncated_z(64, 128, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(z, again)
    plain = truncated_z(4, 8, None, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randn(4, 8, generator=torch.Generator().manual_seed(3)))
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="truncation"):
            truncated_z(1, 8, bad)


@pytest.mark.parametrize(("frame", "message"), [
    ({"class_id": [0, 3], "seed": [1, 2]}, "class_id: row 1: 3 is out of range"),
    ({"class_id": [0], "seed": [-1]}, "seed: row 0: -1 is outside"),
    ({"class_id": [0], "seed": [1.5]}, "seed: row 0: expected an integer"),
    ({"class_id": [0]}, "seed: missing column"),
    ({"seed": [0]}, "class_id: missing column"),
    ({"class_id": [0], "seed": [1], "truncation": [0.0]}, "truncation: row 0: expected a number"),
    ({"class_id": [0], "seed": [1], "colour": ["red"]}, "colour: unknown column"),
    ({"class_id": [0] * 9, "seed": list(range(9))}, "input: 9 rows; at most 8 per request"),
    ({"class_id": [], "seed": []}, "input: no rows"),
])
def test_bad_requests_name_the_field_in_one_line(frame, message):
    with pytest.raises(RequestError) as exc:
        parse_requests(pd.DataFrame(frame), num_classes=3, max_rows=8)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_unconditional_models_refuse_a_class():
    assert parse_requests({"seed": [4]}, num_classes=0) == [SampleRequest(4)]
    with pytest.raises(RequestError, match="^class_id: row 0: this model is unconditional"):
        parse_requests({"seed": [4], "class_id": [1]}, num_classes=0)


def test_same_request_same_bytes_in_any_batch():
    G = tiny_generator("model.num_classes=3").eval()
    a = SampleRequest(7, 1, 0.7)
    alone = render_pngs(G, [a])[0]
    batch = render_pngs(G, [SampleRequest(1, 0), a, SampleRequest(7, 2), a])
    assert batch[1] == batch[3]
    # another batch size may pick other kernels: pixels equal up to one rounding level
    px = [np.asarray(Image.open(io.BytesIO(b))).astype(int) for b in (alone, batch[1])]
    assert np.abs(px[0] - px[1]).max() <= 1
    assert batch[2] != batch[1]  # another class
    with Image.open(io.BytesIO(alone)) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    grid = grid_png(torch.zeros(6, 3, 32, 32), ncols=3)
    with Image.open(io.BytesIO(grid)) as img:
        assert img.size == (3 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_logged_model_is_a_png_pyfunc_and_a_pt2_module(tmp_path: Path):
    """One registered version: mlflow.pyfunc draws PNGs, mlflow.pytorch gives the pt2 module,
    and load_generator_any rebuilds the full Generator, all from the same weights."""
    import mlflow

    from pipelines.model_io import load_generator_any
    from pipelines.registry import log_generator

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        run_id = run.info.run_id
    G = tiny_generator("model.num_classes=3")
    log_generator(uri, run_id, G.state_dict(), G.cfg, "png-gen", fid=1.0)
    model = mlflow.pyfunc.load_model("models:/png-gen@champion")
    out = model.predict(pd.DataFrame({"class_id": [2, 2], "seed": [5, 5],
                                      "truncation": [0.5, 0.5]}))
    assert list(out.columns) == ["image"] and out["image"][0] == out["image"][1]
    full = load_generator_any("models:/png-gen@champion", "cpu", tracking_uri=uri).generator
    assert out["image"][0] == render_pngs(full, [SampleRequest(5, 2, 0.5)] * 2)[0]
    module = mlflow.pytorch.load_model("models:/png-gen@champion")
    z = torch.randn(2, G.z_dim)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(module(z, y), full(z, y), atol=1e-4)
    with pytest.raises(mlflow.exceptions.MlflowException, match="class_id: row 0"):
        model.predict(pd.DataFrame({"class_id": [3], "seed": [1]}))
