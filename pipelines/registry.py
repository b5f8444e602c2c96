"""The EMA generator as an MLflow model: export, registration with aliases, and loading back.

What is logged (pipelines/model_format.py): a pyfunc that draws PNGs (`mlflow models serve`,
`mlflow.pyfunc.load_model`: class_id, seed, truncation -> image bytes), a pt2 graph of the
generator with spectral norm baked in (`mlflow.pytorch.load_model` gives a module taking z, and
y when conditional), and its exact state dict and model config, from which
`load_registered_generator` rebuilds the full `sagan.models.Generator` (attention maps
included).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipelines import model_format
from pipelines.model_format import MODEL_CONFIG_FILE, MODEL_STATE_FILE
from pipelines.png_model import generator_from_files
from pipelines.tracking import TrackingError
from sagan.config import Config, ModelConfig
from sagan.eval.names import IFID_CLASS_PREFIX, headline_keys
from sagan.eval.protocol import PREFIX as PROTOCOL_PREFIX
from sagan.models import Generator

__all__ = ["MODEL_CONFIG_FILE", "MODEL_STATE_FILE", "describe_version", "load_registered_generator",
           "log_generator"]


def log_generator(uri: str, run_id: str, G_state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  registered_name: str, fid: float | None = None, step: int | None = None,
                  aliases: tuple[str, ...] = ()) -> str:
    """Log the EMA generator as an MLflow model (a PNG-drawing pyfunc and a pt2 graph, plus the
    exact state_dict and model config: pipelines/model_format.py), register it, set aliases,
    and move `champion` to it when its FID beats the current champion's. Returns the version.

    `latest` is not set by us: MLflow reserves that alias name and resolves
    `models:/NAME@latest` to the newest version itself, so every registration is `latest`."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = Model.log(None, name="generator", flavor=model_format, flavor_name="python_function",
                         registered_model_name=registered_name,
                         metadata={"sagan_model": asdict(model_cfg)},
                         generator_state=G_state, model_cfg=model_cfg)
    version = str(info.registered_model_version)
    client = MlflowClient(uri)
    if fid is not None:
        client.set_model_version_tag(registered_name, version, "fid", f"{fid:.6f}")
    if step is not None:
        client.set_model_version_tag(registered_name, version, "step", str(step))
    client.set_model_version_tag(registered_name, version, "run_id", run_id)
    for alias in aliases:
        client.set_registered_model_alias(registered_name, alias, version)
    if fid is not None and _beats_champion(client, registered_name, fid):
        client.set_registered_model_alias(registered_name, "champion", version)
    return version


def describe_version(uri: str, name: str, version: str, cfg: Config, step: int,
                     metrics: dict[str, float], datasets: dict[str, Any] | None = None) -> None:
    """What a reader of the registry needs without opening the run: a description (the scores
    of `sagan.eval.names`, the protocol they were measured under, intra-class FID per class,
    step, dataset, key config) and tags on the version (scores, `protocol.*`), the per-class
    iFID as a table artifact of the run, and the scores logged against the MLflow 3
    LoggedModel behind it, so the experiment's Models tab compares versions.

    The metrics are the run's own points (same step and timestamp) with the model's id added:
    MLflow links them to the model and does not duplicate them in the run's history."""
    client = MlflowClient(uri)
    mv = client.get_model_version(name, version)
    scores = {k: float(metrics[k]) for k in headline_keys() if metrics.get(k) is not None}
    # the protocol rank 0 measured under (train_loop sets it as run tags at each evaluation)
    protocol = {k: v for k, v in client.get_run(mv.run_id).data.tags.items()
                if k.startswith(PROTOCOL_PREFIX)} if scores else {}
    per_class = sorted((int(k[len(IFID_CLASS_PREFIX):]), float(v)) for k, v in metrics.items()
                       if k.startswith(IFID_CLASS_PREFIX))
    train = (datasets or {}).get("training")
    evaluation = (datasets or {}).get("evaluation")
    m, t = cfg.model, cfg.train
    lines = [f"SAGAN generator (EMA weights) at step {step} of {t.steps}, run {mv.run_id}.",
             ("Scores: " + ", ".join(f"{k.upper()} {v:.4g}" for k, v in scores.items())
              + f" ({cfg.eval.num_samples} generated images"
              + (f" vs {evaluation.name} [{evaluation.digest}]" if evaluation else "") + ")")
             if scores else "Scores: not evaluated (eval.eval_every=0).",
             *(["Intra-class FID per class: " + ", ".join(f"{c}: {v:.4g}" for c, v in per_class)
                + " (table: ifid_per_class.json in the run's artifacts)."] if per_class else []),
             *(["Protocol (compare scores only at the same protocol.id): " + "; ".join(
                 f"{k[len(PROTOCOL_PREFIX):]} {v}" for k, v in sorted(protocol.items()))]
               if protocol else []),
             f"Dataset: {train.name} [{train.digest}] at {cfg.data.path}" if train
             else f"Dataset: {cfg.data.path}",
             f"Model: {m.image_size} px, {m.channels} ch, {m.num_classes} classes, g_ch "
             f"{m.g_ch}, d_ch {m.d_ch}, z {m.z_dim}, attention G {list(m.g_attention)} "
             f"D {list(m.d_attention)}.",
             f"Training: batch {t.batch_size}, lr_g {t.lr_g:g}, lr_d {t.lr_d:g}, beta2 "
             f"{t.beta2:g}, ndis {t.ndis}, {t.loss} loss, EMA {t.ema_decay:g}."]
    client.update_model_version(name, version, description="\n\n".join(lines))
    # (`fid` is already a tag, at the precision `champion` is decided by)
    tags = {**{k: f"{v:.6g}" for k, v in scores.items() if k != "fid"}, "step": str(step),
            "image_size": str(m.image_size), "g_attention": str(list(m.g_attention)),
            "d_attention": str(list(m.d_attention)), "data.path": cfg.data.path}
    if train:
        tags.update({"dataset": train.name, "dataset_digest": train.digest})
    tags.update(protocol)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if per_class:
        client.log_table(mv.run_id, {"class": [c for c, _ in per_class],
                                     "ifid": [v for _, v in per_class]}, "ifid_per_class.json")
    # the LoggedModel behind the version: its id, or the `models:/m-...` URI it was made from
    model_id = mv.model_id or (mv.source[len("models:/"):]
                               if (mv.source or "").startswith("models:/m-") else None)
    if model_id and scores:
        logged = {k: [p for p in client.get_metric_history(mv.run_id, k) if p.step == step]
                  for k in scores}
        points = [Metric(k, v, logged[k][-1].timestamp if logged[k] else
                         int(time.time() * 1000), step, model_id=model_id,
                         dataset_name=evaluation.name if evaluation else None,
                         dataset_digest=evaluation.digest if evaluation else None)
                  for k, v in scores.items()]
        client.log_batch(mv.run_id, metrics=points)


def _beats_champion(client: MlflowClient, name: str, fid: float) -> bool:
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return True
    champ_fid = champ.tags.get("fid")
    return champ_fid is None or fid < float(champ_fid)


def load_registered_generator(model_uri: str, device: str | torch.device = "cpu",
                              tracking_uri: str | None = None) -> tuple[Generator, ModelConfig]:
    """Rebuild the full `Generator` (attention maps available) from a logged model's extra
    files: `models:/name@alias`, `runs:/id/generator`, or a local model directory."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(model_uri) if Path(model_uri).is_dir() else Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    state_files = list(local.rglob(MODEL_STATE_FILE))
    cfg_files = list(local.rglob(MODEL_CONFIG_FILE))
    if not state_files or not cfg_files:
        raise TrackingError(f"model '{model_uri}': not a SAGAN generator (no {MODEL_STATE_FILE} "
                            f"/ {MODEL_CONFIG_FILE} in its files)")
    G = generator_from_files(state_files[0], cfg_files[0], device)
    return G, G.cfg
