"""MLflow wiring for the pipelines: tracking URI, run lookup/creation, logging, model registry.

Only pipelines/ import mlflow. Runs are found again by the tag `sagan.run_name`, so a re-submitted
job with the same `train.run_name` continues the same MLflow run (one run per training, however
many restarts it took).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from sagan.config import Config, ModelConfig, flatten, to_yaml
from sagan.layers import refresh_spectral_norm
from sagan.models import Generator

# Artifact transfers stream through the tracking server. MLflow >= 3 clients otherwise ask a
# server with an S3 artifact store for presigned S3 URLs, which carry the *server's* access key
# id and STS session token (X-Amz-Credential, X-Amz-Security-Token) to every client and into
# every access log on the way (tests/test_reliability_secrets.py). An explicit setting wins.
for _var in ("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"):
    os.environ.setdefault(_var, "false")

RUN_NAME_TAG = "sagan.run_name"
MODEL_STATE_FILE = "sagan_generator.pt"
MODEL_CONFIG_FILE = "sagan_model.yaml"
# Environment variables whose values must never reach MLflow params, tags, artifacts or logs.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID")


class TrackingError(RuntimeError):
    """MLflow is unreachable or misconfigured; one clear line."""


def resolve_tracking_uri(cfg: Config, project_dir: Path | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store under the project dir
    (sqlite rather than ./mlruns files because the model registry needs a database)."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = (project_dir or Path.cwd()) / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve()}/mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any cluster work) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user's URI
            if resp.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {resp.status} "
                                    "on /health")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                            "or set tracking.tracking_uri / MLFLOW_TRACKING_URI") from None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs: dict[str, Any] = {}
    if uri.startswith("sqlite:///"):  # keep local artifacts next to the database
        kwargs["artifact_location"] = Path(uri[len("sqlite:///"):]).parent.joinpath(
            "artifacts").as_uri()
    return client.create_experiment(name, **kwargs)


def find_or_create_run(cfg: Config, uri: str, parent_run_id: str | None = None,
                       extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the newest run tagged with this run name, or a new one with the
    resolved config logged as params and as `config.yaml`."""
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, cfg.tracking.experiment, uri)
    name = cfg.train.run_name
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.log_text(run_id, to_yaml(cfg), "config_resumed.yaml")
        return run_id, True
    tags = {RUN_NAME_TAG: name, **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = [mlflow.entities.Param(k, _param_value(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    return run_id, False


def _param_value(v: Any) -> str:
    return str(v)[:6000]


class RunLogger:
    """Client-API logger for one existing run (no global active-run state in workers).

    Steps already present in the run's history are not logged again, so a resumed run keeps one
    continuous, duplicate-free metric history."""

    def __init__(self, uri: str, run_id: str, probe_metric: str = "loss_d"):
        self.client, self.run_id = MlflowClient(uri), run_id
        history = self.client.get_metric_history(run_id, probe_metric)
        self.last_logged = max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.last_logged:
            return
        ts = int(1000 * time.time())
        batch = [mlflow.entities.Metric(k.replace("/", "."), float(v), ts, step)
                 for k, v in metrics.items() if v == v and abs(v) != float("inf")]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)


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


def log_generator(uri: str, run_id: str, G_state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                  registered_name: str, fid: float | None = None, step: int | None = None,
                  aliases: tuple[str, ...] = ()) -> str:
    """Log the EMA generator as an MLflow model (pt2 graph + signature + input example, plus
    the exact state_dict and model config as extra files), register it, set aliases, and
    move `champion` to it when its FID beats the current champion's. Returns the version.

    `latest` is not set by us: MLflow reserves that alias name and resolves
    `models:/NAME@latest` to the newest version itself, so every registration is `latest`."""
    G = Generator(model_cfg)
    G.load_state_dict(G_state)
    sampler = _Sampler(_export_copy(G)).eval()
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
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / MODEL_STATE_FILE
        torch.save(G_state, state_path)
        cfg_path = Path(tmp) / MODEL_CONFIG_FILE
        cfg_path.write_text(yaml.safe_dump(asdict(model_cfg), sort_keys=False))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                sampler, name="generator", signature=signature, input_example=example,
                extra_files=[str(state_path), str(cfg_path)],
                registered_model_name=registered_name,
                metadata={"sagan_model": asdict(model_cfg)})
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
    from sagan.config import config_from_dict

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(model_uri) if Path(model_uri).is_dir() else Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    state_files = list(local.rglob(MODEL_STATE_FILE))
    cfg_files = list(local.rglob(MODEL_CONFIG_FILE))
    if not state_files or not cfg_files:
        raise TrackingError(f"model '{model_uri}': not a SAGAN generator (no {MODEL_STATE_FILE} "
                            f"/ {MODEL_CONFIG_FILE} in its files)")
    model_cfg = config_from_dict({"model": yaml.safe_load(cfg_files[0].read_text())}).model
    G = Generator(model_cfg)
    G.load_state_dict(torch.load(state_files[0], map_location="cpu", weights_only=True))
    refresh_spectral_norm(G)
    return G.to(device).eval(), model_cfg
