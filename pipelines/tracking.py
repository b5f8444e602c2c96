"""MLflow runs for the pipelines: tracking URI, reachability, one run per training, logging.

Runs are found again by the tag `sagan.run_name`, so a re-submitted job with the same
`cluster.run_name` continues the same MLflow run (one run per training, however many restarts it
took). Models and the registry: pipelines/registry.py.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from sagan.config import flatten, to_yaml

# Artifact transfers stream through the tracking server. MLflow >= 3 clients otherwise ask a
# server with an S3 artifact store for presigned S3 URLs, which carry the *server's* access key
# id and STS session token (X-Amz-Credential, X-Amz-Security-Token) to every client and into
# every access log on the way (tests/test_reliability_secrets.py). An explicit setting wins.
for _var in ("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"):
    os.environ.setdefault(_var, "false")
# Registering a model downloads its files once; no progress bars for that in a job's log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

RUN_NAME_TAG = "sagan.run_name"
STOPPED_TAG = "sagan.stopped"


class TrackingError(RuntimeError):
    """MLflow is unreachable or misconfigured; one clear line."""


def resolve_tracking_uri(cfg: PipelineConfig, project_dir: Path | None = None) -> str:
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


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created if needed (with a sqlite store, artifacts go next to the
    database, not into the working directory)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs: dict[str, Any] = {}
    if uri.startswith("sqlite:///"):  # keep local artifacts next to the database
        kwargs["artifact_location"] = Path(uri[len("sqlite:///"):]).parent.joinpath(
            "artifacts").as_uri()
    return client.create_experiment(name, **kwargs)


def find_or_create_run(cfg: PipelineConfig, uri: str, parent_run_id: str | None = None,
                       extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the newest run tagged with this run name, or a new one with the
    resolved config logged as params and as `config.yaml`."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, uri)
    name = cfg.cluster.run_name
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

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags (overwritable, unlike params: a resumed run may set them again)."""
        self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)[:5000])
                                                 for k, v in tags.items()])

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image under `key` at `step`: the run page shows each key as an image chart with
        a step slider (MLflow's image logging, not a loose artifact file)."""
        if step > self.last_logged:
            self.client.log_image(self.run_id, image, key=key, step=step)


def system_metrics(uri: str, run_id: str, interval_s: float, node_id: str | None = None) -> Any:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU through
    nvidia-ml-py when one is present) for this process's node, started; `finish()` stops it.
    Metrics are `system/<name>`, or `system/<node_id>/<name>` when several nodes log to one
    run. Its steps continue after the ones already logged, so a resumed run's charts go on."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its start/stop/"no GPU" INFO lines would land in every job log; warnings still show
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                   node_id=node_id, tracking_uri=uri)
    monitor.start()
    return monitor


def mark_stopped(uri: str, run_id: str, reason: str) -> None:
    """The run ended without a usable result: FAILED, with the one-line reason as a tag."""
    client = MlflowClient(uri)
    client.set_tag(run_id, STOPPED_TAG, reason[:5000])
    client.set_terminated(run_id, "FAILED")


def mark_finished(uri: str, run_id: str) -> None:
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
