"""The generator as an image service: requests (class_id, seed, truncation) -> PNG bytes.

    rows = parse_requests(df, num_classes=10, max_rows=64)     # RequestError: one line, a field
    pngs = render_pngs(G, rows, device="cpu")                  # one PNG (bytes) per row

Why here and not in sagan/: `PngGenerator` is an `mlflow.pyfunc.PythonModel` (MLflow's
convention for image generators: predict returns a column of PNG bytes, which
`mlflow models serve` base64-encodes), and the Ray Serve app (pipelines/serve.py) validates and
renders with the same two functions, so both servers answer the same request with the same bytes.

A row's image depends only on (model, class_id, seed, truncation): z comes from its own
generator seeded by `seed` (sagan.truncation.truncated_z), never from the batch it rides in.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image

from sagan.truncation import check_truncation, truncated_z

COLUMNS = ("class_id", "seed", "truncation")
MAX_ROWS = 64  # default per-request limit (pyfunc model_config "max_rows", serve option)
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit value
# the models-from-code file MLflow executes to build the PythonModel (no pickle on load)
CODE_FILE = Path(__file__).with_name("png_model_code.py")


class RequestError(ValueError):
    """A bad request; the message is one line and starts with the field it is about."""


@dataclass(frozen=True)
class SampleRequest:
    seed: int
    class_id: int | None = None
    truncation: float | None = None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_int(field: str, v: Any, at: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise RequestError(f"{field}:{at} expected an integer, got {v!r}")
    if isinstance(v, (float, np.floating)) and (not math.isfinite(v) or v != int(v)):
        raise RequestError(f"{field}:{at} expected an integer, got {v!r}")
    return int(v)


def check_request(seed: Any, class_id: Any, truncation: Any, num_classes: int,
                  row: int | None = None) -> SampleRequest:
    """One request checked against the model: RequestError naming the field (and the row of a
    table), else the request."""
    at = "" if row is None else f" row {row}:"
    if _missing(seed):
        raise RequestError(f"seed:{at} missing (an integer in [0, 2^63))")
    s = _as_int("seed", seed, at)
    if not 0 <= s < SEED_LIMIT:
        raise RequestError(f"seed:{at} {s} is outside [0, 2^63)")
    c = None
    if num_classes > 0:
        if _missing(class_id):
            raise RequestError(f"class_id:{at} missing (this model has {num_classes} "
                               f"classes, 0..{num_classes - 1})")
        c = _as_int("class_id", class_id, at)
        if not 0 <= c < num_classes:
            raise RequestError(f"class_id:{at} {c} is out of range (this model has "
                               f"{num_classes} classes, 0..{num_classes - 1})")
    elif not _missing(class_id):
        raise RequestError(f"class_id:{at} this model is unconditional; leave it out")
    t = None
    if not _missing(truncation):
        if isinstance(truncation, (bool, np.bool_, str)):
            raise RequestError(f"truncation:{at} expected a number > 0, got "
                               f"{truncation!r}")
        try:
            t = check_truncation(truncation)
        except (TypeError, ValueError):
            raise RequestError(f"truncation:{at} expected a number > 0, got "
                               f"{truncation!r}") from None
    return SampleRequest(s, c, t)


def parse_requests(df: Any, num_classes: int, max_rows: int = MAX_ROWS) -> list[SampleRequest]:
    """A pandas DataFrame (or a dict of columns) -> checked requests; RequestError otherwise."""
    import pandas as pd

    if isinstance(df, dict):
        df = pd.DataFrame(df)
    if not isinstance(df, pd.DataFrame):
        raise RequestError(f"input: expected a table with columns {', '.join(COLUMNS)}, got "
                           f"{type(df).__name__}")
    unknown = [str(c) for c in df.columns if c not in COLUMNS]
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown column (expected {', '.join(COLUMNS)})")
    if "seed" not in df.columns:
        raise RequestError("seed: missing column (an integer per row)")
    if num_classes > 0 and "class_id" not in df.columns:
        raise RequestError(f"class_id: missing column (this model has {num_classes} classes)")
    if len(df) == 0:
        raise RequestError("input: no rows")
    if len(df) > max_rows:
        raise RequestError(f"input: {len(df)} rows; at most {max_rows} per request")
    records = df.astype(object).to_dict("records")
    return [check_request(r.get("seed"), r.get("class_id"), r.get("truncation"), num_classes, i)
            for i, r in enumerate(records)]


def request_z(req: SampleRequest, z_dim: int) -> torch.Tensor:
    """(1, z_dim): the request's z, from a generator seeded by its seed alone."""
    return truncated_z(1, z_dim, req.truncation, torch.Generator().manual_seed(req.seed))


def png_bytes(x: torch.Tensor) -> bytes:
    """(C, H, W) in [-1, 1] -> PNG bytes (L or RGB, no metadata: equal images, equal bytes)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def render(G: torch.nn.Module, reqs: list[SampleRequest],
           device: str | torch.device = "cpu") -> torch.Tensor:
    """One forward pass over all requests: (n, C, H, W) float images on the CPU."""
    z = torch.cat([request_z(r, G.z_dim) for r in reqs]).to(device)
    y = (torch.tensor([r.class_id for r in reqs], dtype=torch.long, device=device)
         if G.num_classes > 0 else None)
    return G(z, y).float().cpu()


def grid_png(images: torch.Tensor, ncols: int, padding: int = 2) -> bytes:
    """(n, C, H, W) in [-1, 1] -> one PNG, row-major, `ncols` per row, black padding."""
    n, c, h, w = images.shape
    rows = -(-n // ncols)
    canvas = torch.full((c, rows * (h + padding) + padding, ncols * (w + padding) + padding), -1.0)
    for i, x in enumerate(images):
        top, left = padding + (i // ncols) * (h + padding), padding + (i % ncols) * (w + padding)
        canvas[:, top:top + h, left:left + w] = x
    return png_bytes(canvas)


def render_pngs(G: torch.nn.Module, reqs: list[SampleRequest],
                device: str | torch.device = "cpu") -> list[bytes]:
    return [png_bytes(x) for x in render(G, reqs, device)]


def generator_from_files(state_path: str | Path, config_path: str | Path,
                         device: str | torch.device = "cpu") -> torch.nn.Module:
    """The full Generator (eval, SN vectors refreshed) from the logged state dict + config."""
    import yaml

    from sagan.config import config_from_dict
    from sagan.layers import refresh_spectral_norm
    from sagan.models import Generator

    model_cfg = config_from_dict({"model": yaml.safe_load(Path(config_path).read_text())}).model
    G = Generator(model_cfg)
    G.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    refresh_spectral_norm(G)
    return G.to(device).eval()


class PngGenerator(PythonModel):
    """MLflow pyfunc: DataFrame(class_id, seed, truncation) -> DataFrame(image: PNG bytes).

    Artifacts `state` and `config` are the files `load_generator_any` also reads; model_config
    `max_rows` bounds one request, `device` picks where G runs (default: cuda when present)."""

    def load_context(self, context):  # noqa: ANN001 (MLflow reads predict's type hints)
        cfg = dict(context.model_config or {})
        self.max_rows = int(cfg.get("max_rows", MAX_ROWS))
        self.device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.G = generator_from_files(context.artifacts["state"], context.artifacts["config"],
                                      self.device)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (no hints: see above)
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            reqs = parse_requests(model_input, self.G.num_classes, self.max_rows)
        except RequestError as exc:  # the scoring server answers 400 with this line
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return pd.DataFrame({"image": render_pngs(self.G, reqs, self.device)})
