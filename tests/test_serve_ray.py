"""Issue 29, part 2: the Ray Serve app (pipelines/serve.py) on the local stack's Ray cluster,
driven over real HTTP on 127.0.0.1: images, grids, errors, batching, and the `champion` alias
moving to a new version while requests keep flowing.

The model is the one `pipelines/train.py` registered (tests/fixtures/champion.py). Replicas ask
for half a CPU so the app fits beside the stack's other work on a 2-core machine.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infra.local.config import free_ports
from tests.fixtures.stack import ROOT

pytestmark = pytest.mark.slow
SERVE = str(Path(sys.executable).parent / "serve")  # Ray Serve's CLI, beside this interpreter


@dataclass
class App:
    url: str
    proc: subprocess.Popen


def _get(url: str, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else ""
        try:
            status, _, body = _get(url, timeout=5)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not up within {timeout} s"
        time.sleep(1)


def _env(local_stack) -> dict[str, str]:
    return {**local_stack.environ(), "MLFLOW_TRACKING_URI": local_stack.mlflow_uri,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def app(local_stack, champion_model) -> Iterator[App]:
    """`python pipelines/serve.py --model models:/NAME@champion` on the stack's Ray."""
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "pipelines/serve.py", "--model",
         f"models:/{champion_model.name}@champion", "--port", str(port),
         "--cpus-per-replica", "0.5", "--poll-s", "1", "--max-batch-size", "8",
         "--batch-wait-ms", "50"],
        env=_env(local_stack), cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(f"{url}/", proc)
        yield App(url, proc)
    finally:
        _stop(proc)


def _png(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as img:
        return np.asarray(img).astype(int)


def test_sample_and_grid(app, champion_model):
    """GET /sample -> image/png of the model's size and channels, naming the version; the
    same request repeats its bytes, another class differs; the image is the generator's own
    (rendered here from the registry, equal up to one rounding level); /grid tiles classes.
    The README's requests: `curl -s 'localhost:8000/sample?class_id=3&seed=7&truncation=0.7' -o
    sample.png` and `curl -s 'localhost:8000/grid?classes=0,3,7&n=8' -o grid.png`."""
    from pipelines.model_io import load_generator_any
    from pipelines.png_model import SampleRequest, render_pngs

    status, headers, body = _get(f"{app.url}/sample?class_id=3&seed=7&truncation=0.7")
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    assert headers["x-model-version"] == champion_model.version
    assert _png(body).shape == (32, 32)  # Fashion-MNIST: 32 px, one channel
    assert _get(f"{app.url}/sample?class_id=3&seed=7&truncation=0.7")[2] == body
    assert _get(f"{app.url}/sample?class_id=4&seed=7&truncation=0.7")[2] != body
    G = load_generator_any(f"models:/{champion_model.name}/{champion_model.version}", "cpu",
                           tracking_uri=champion_model.mlflow_uri).generator
    local = render_pngs(G, [SampleRequest(7, 3, 0.7)])[0]
    assert np.abs(_png(local) - _png(body)).max() <= 1

    status, headers, grid = _get(f"{app.url}/grid?classes=0,3,7&n=8")
    assert status == 200 and headers["content-type"] == "image/png"
    assert _png(grid).shape == (3 * 34 + 2, 8 * 34 + 2)  # 3 rows x 8 columns, 2 px padding


@pytest.mark.parametrize(("query", "start"), [
    ("sample?class_id=10&seed=1", "class_id: 10 is out of range"),
    ("sample?class_id=1&seed=x", "seed: expected an integer, got 'x'"),
    ("sample?class_id=1", "seed: missing"),
    ("sample?class_id=1&seed=1&truncation=0", "truncation: expected a number > 0"),
    ("sample?class_id=1&seed=1&size=64", "size: unknown parameter"),
    ("grid?n=1000", "n: 1000 x 10 classes must be 1..256 images"),
    ("grid?classes=a,b", "classes: expected a comma list"),
])
def test_bad_requests_get_400_naming_the_field(app, query, start):
    status, _, body = _get(f"{app.url}/{query}")
    text = body.decode()
    assert status == 400 and text.startswith(start) and text.count("\n") == 1, text


def test_concurrent_requests_are_batched(app):
    """16 clients at once on one replica: @serve.batch runs some of them in one forward pass,
    and every client still gets its own image."""
    before = json.loads(_get(f"{app.url}/")[2])["batches"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda s: _get(f"{app.url}/sample?class_id=1&seed={s}"),
                                range(100, 116)))
    assert all(status == 200 for status, _, _ in answers)
    assert len({body for _, _, body in answers}) == 16
    after = json.loads(_get(f"{app.url}/")[2])["batches"]
    assert after["requests"] - before["requests"] == 16
    assert after["count"] - before["count"] < 16 and after["largest"] > 1, (before, after)


def test_champion_moves_without_dropping_requests(app, champion_model):
    """A new version becomes champion while a client keeps requesting: every request answers
    200, the versions go from the old one to the new one and never back, and the new version
    draws a different image for the same request."""
    from mlflow.tracking import MlflowClient

    from pipelines.registry import log_generator
    from sagan.checkpoint import ema_weights, load_checkpoint

    client = MlflowClient(champion_model.mlflow_uri)
    old = client.get_model_version(champion_model.name, champion_model.version)
    state = ema_weights(load_checkpoint(champion_model.checkpoint))
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in state.items()}
    from pipelines.model_io import load_generator_any

    model_cfg = load_generator_any(f"models:/{old.name}/{old.version}", "cpu",
                                   tracking_uri=champion_model.mlflow_uri).model_cfg
    new = log_generator(champion_model.mlflow_uri, old.run_id, moved, model_cfg, old.name)
    seen: list[tuple[int, str, bytes]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            status, headers, body = _get(f"{app.url}/sample?class_id=2&seed=5")
            seen.append((status, headers.get("x-model-version", ""), body))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(1)
        client.set_registered_model_alias(old.name, "champion", new)
        deadline = time.monotonic() + 60
        while not (seen and seen[-1][1] == new):
            assert time.monotonic() < deadline, "the app still serves the old version after 60 s"
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
        client.set_registered_model_alias(old.name, "champion", old.version)
    assert all(status == 200 for status, _, _ in seen)
    versions = [v for _, v, _ in seen]
    switch = versions.index(new)
    assert switch > 0 and set(versions[:switch]) == {old.version}
    assert set(versions[switch:]) == {new}
    assert seen[0][2] != seen[-1][2]


def test_unknown_alias_stops_before_any_replica(local_stack):
    proc = subprocess.run([sys.executable, "pipelines/serve.py", "--model",
                           "models:/no-such-gen@champion"], env=_env(local_stack), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(
        "serve.py: error: model: models:/no-such-gen@champion: not in the registry"), proc.stderr


def test_readme_serve_run_app_builder(local_stack, champion_model, app):
    """The README's `serve run pipelines.serve:app model=models:/sagan-fashion-quickstart@champion`
    (here the test's model, under another route on the same Serve proxy); a misspelt option
    stops the build with one line naming it. Runs last: `serve run` shuts Serve down on exit."""
    env = _env(local_stack)
    bad = subprocess.run(
        [SERVE, "run", "pipelines.serve:app",
         "modle=models:/x@champion"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert bad.returncode != 0 and "modle: unknown option" in bad.stdout + bad.stderr
    proc = subprocess.Popen(
        [SERVE, "run", "--name", "readme",
         "--route-prefix", "/readme", "pipelines.serve:app",
         f"model=models:/{champion_model.name}@champion", "cpus_per_replica=0.5"],
        env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        info = _wait_up(f"{app.url}/readme/", proc)
        assert info["model"] == f"models:/{champion_model.name}@champion"
        status, headers, body = _get(f"{app.url}/readme/sample?class_id=3&seed=7")
        assert status == 200 and headers["content-type"] == "image/png"
        assert _png(body).shape == (32, 32)
    finally:
        _stop(proc, signal.SIGINT)
