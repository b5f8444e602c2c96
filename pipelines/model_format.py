"""What a registered generator's MLflow model directory holds: two flavors over one set of files.

    mlflow.models.Model.log(name="generator", flavor=pipelines.model_format,
                            generator_state=G.state_dict(), model_cfg=cfg.model)

- `python_function`: `pipelines.png_model.PngGenerator` (models-from-code, no pickle):
  DataFrame(class_id, seed, truncation) -> DataFrame(image: PNG bytes). This is what
  `mlflow models serve -m models:/NAME@champion` and `mlflow.pyfunc.load_model` use, and what the
  model's signature describes (the registry UI shows it).
- `pytorch`: a pt2 graph of the generator with spectral norm baked in (z, y -> images in
  [-1, 1]) for `mlflow.pytorch.load_model`, as before.
- artifacts/sagan_generator.pt + sagan_model.yaml: the exact EMA state dict and model config,
  from which `load_generator_any` rebuilds the full Generator (attention maps included).

Why one model with two flavors rather than two models: a registry version points at one model,
and `champion` must be both servable as images and loadable as a torch module.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from pipelines.png_model import CODE_FILE, MAX_ROWS
from sagan.config import ModelConfig
from sagan.layers import refresh_spectral_norm
from sagan.models import Generator

MODEL_STATE_FILE = "sagan_generator.pt"
MODEL_CONFIG_FILE = "sagan_model.yaml"


class _Sampler(torch.nn.Module):
    """What is exported: (z, y) -> images, for conditional generators; z -> images otherwise."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G = G

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.G(z, y)


def _export_copy(G: Generator) -> Generator:
    """Eval-mode copy with spectral norm baked into plain weights (refreshed first)."""
    G = copy.deepcopy(G).cpu()
    refresh_spectral_norm(G)
    G.eval()
    for m in G.modules():
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            torch.nn.utils.parametrize.remove_parametrizations(m, "weight",
                                                               leave_parametrized=True)
    return G


def png_signature(model_cfg: ModelConfig) -> tuple[ModelSignature, pd.DataFrame]:
    """The pyfunc's columns, all optional in the schema: PngGenerator checks them itself, so a
    missing or bad one gets a one-line error naming it instead of a schema dump."""
    cols = [ColSpec("long", "seed", required=False), ColSpec("double", "truncation",
                                                             required=False)]
    example = {"seed": [0, 1], "truncation": [1.0, 0.7]}
    if model_cfg.num_classes > 0:
        cols.insert(0, ColSpec("long", "class_id", required=False))
        example = {"class_id": [0, 1 % model_cfg.num_classes], **example}
    return (ModelSignature(inputs=Schema(cols), outputs=Schema([ColSpec("binary", "image")])),
            pd.DataFrame(example))


def _requirements() -> list[str]:
    """Pinned from this environment, not inferred: inference loads the model in a subprocess
    (seconds per registration). `sagan` itself must be installed where the model is served."""
    import PIL

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}", f"pandas=={pd.__version__}", f"pillow=={PIL.__version__}",
            f"pyyaml=={yaml.__version__}"]


def _save_pt2(G: Generator, model_cfg: ModelConfig, path: str) -> dict:
    """The pt2 graph saved as its own MLflow model at `path`; returns its pytorch flavor."""
    n = 2
    z = torch.randn(n, model_cfg.z_dim)
    inputs = [TensorSpec(np.dtype(np.float32), (-1, model_cfg.z_dim), "z")]
    example: tuple[torch.Tensor, ...] = (z,)
    if model_cfg.num_classes > 0:
        example = (z, torch.arange(n) % model_cfg.num_classes)
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "y"))
    s = model_cfg.image_size
    signature = ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model_cfg.channels, s, s))]))
    mlflow.pytorch.save_model(_Sampler(_export_copy(G)).eval(), path, signature=signature,
                              input_example=example, serialization_format="pt2",
                              pip_requirements=_requirements())
    return Model.load(path).flavors["pytorch"]


def save_model(path: str, mlflow_model: Model | None = None, *,
               generator_state: dict[str, torch.Tensor], model_cfg: ModelConfig,
               max_rows: int = MAX_ROWS, **_: object) -> None:
    """The flavor hook `Model.log` calls: write both flavors and the artifacts into `path`."""
    mlflow_model = mlflow_model or Model()
    G = Generator(model_cfg)
    G.load_state_dict(generator_state)
    signature, example = png_signature(model_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / MODEL_STATE_FILE
        torch.save(generator_state, state_path)
        cfg_path = Path(tmp) / MODEL_CONFIG_FILE
        cfg_path.write_text(yaml.safe_dump(asdict(model_cfg), sort_keys=False))
        mlflow.pyfunc.save_model(
            path, python_model=str(CODE_FILE), mlflow_model=mlflow_model,
            artifacts={"state": str(state_path), "config": str(cfg_path)},
            signature=signature, input_example=example, model_config={"max_rows": max_rows},
            pip_requirements=_requirements())
        pt2_dir = os.path.join(tmp, "pt2")
        flavor = _save_pt2(G, model_cfg, pt2_dir)
        shutil.copytree(os.path.join(pt2_dir, flavor["model_data"]),
                        os.path.join(path, flavor["model_data"]))
    mlflow_model.add_flavor("pytorch", **flavor)
    mlflow_model.save(os.path.join(path, "MLmodel"))
