"""Issue 29, part 1: the registered champion as MLflow's scoring server, over real HTTP.

`mlflow models serve -m models:/NAME@champion --env-manager local` runs against the local
stack's MLflow server; requests go to 127.0.0.1 on a free port. The model is the one
`pipelines/train.py` registered (tests/fixtures/champion.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from infra.local.config import free_ports
from tests.fixtures.stack import ROOT

pytestmark = pytest.mark.slow


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _frame(rows: list[list], columns: tuple[str, ...] = ("class_id", "seed", "truncation")
           ) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": rows}}


@pytest.fixture(scope="module")
def scoring_server(local_stack, champion_model) -> Iterator[str]:
    """The README's `mlflow models serve` of the champion on a free loopback port."""
    (port,) = free_ports(1)
    # the server runs `uvicorn` from PATH: this interpreter's bin first, as an activated venv
    env = {**local_stack.environ(), "MLFLOW_TRACKING_URI": local_stack.mlflow_uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         f"models:/{champion_model.name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "scoring server not up within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _images(answer: dict) -> list[bytes]:
    return [base64.b64decode(p["image"]) for p in answer["predictions"]]


def test_readme_mlflow_models_serve_draws_pngs(scoring_server, champion_model):
    """The README's `mlflow models serve -m models:/sagan-fashion-quickstart@champion
    --env-manager local -p 5001` (here the test's model and a free port): POST /invocations
    with class_id, seed, truncation returns one PNG per row, of the model's size and channels;
    the same (class, seed) gives the same bytes, in one request and across requests; another
    class or seed gives another image. The README's request, `curl -s
    localhost:5001/invocations -H 'Content-Type: application/json' -d '{"dataframe_records":
    [{"class_id": 3, "seed": 7, "truncation": 0.7}]}'`, is sent as it is."""
    status, readme = _post(f"{scoring_server}/invocations", {"dataframe_records": [
        {"class_id": 3, "seed": 7, "truncation": 0.7}]})
    assert status == 200 and len(_images(readme)) == 1, readme
    rows = [[0, 7, 0.7], [1, 7, 0.7], [0, 7, 0.7], [0, 8, 0.7], [3, 7, None]]
    status, answer = _post(f"{scoring_server}/invocations", _frame(rows))
    assert status == 200, answer
    pngs = _images(answer)
    assert len(pngs) == len(rows)
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (32, 32) and img.mode == "L"  # Fashion-MNIST: 32 px, 1 channel
    assert pngs[0] == pngs[2]  # same class and seed in one request
    assert pngs[0] != pngs[1]  # another class
    assert pngs[0] != pngs[3]  # another seed
    status, again = _post(f"{scoring_server}/invocations", _frame([[0, 7, 0.7]]))
    assert status == 200 and _images(again)[0] == pngs[0]  # another request, another batch
    # records orientation, truncation left out: an untruncated z, another image
    status, plain = _post(f"{scoring_server}/invocations",
                          {"dataframe_records": [{"class_id": 0, "seed": 7}]})
    assert status == 200 and _images(plain)[0] != pngs[0]


def test_a_value_of_the_wrong_type_is_refused_naming_its_column(scoring_server):
    """Types are checked by MLflow's schema enforcement (one line, the column named)."""
    status, answer = _post(f"{scoring_server}/invocations",
                           {"dataframe_records": [{"class_id": 0, "seed": "x"}]})
    assert status == 400 and "column seed" in answer["message"], answer


@pytest.mark.parametrize(("body", "field"), [
    (_frame([[0, 1, None], [10, 2, None]]), "class_id: row 1: 10 is out of range"),
    (_frame([[0, 0.5]], ("class_id", "truncation")), "seed: missing column"),
    (_frame([[0, 1, -0.5]]), "truncation: row 0: expected a number > 0"),
    (_frame([[0, 1, 1.0]] * 65), "input: 65 rows; at most 64 per request"),
    # MLflow's schema enforcement drops columns the signature does not name, typos included
    (_frame([[0, 1]], ("class_id", "sed")), "seed: missing column"),
])
def test_bad_requests_get_4xx_naming_the_field(scoring_server, body, field):
    status, answer = _post(f"{scoring_server}/invocations", body)
    assert 400 <= status < 500, (status, answer)
    # MLflow's server puts the input it was given first; the model's line is the last one
    last = answer["message"].strip().splitlines()[-1]
    assert last == f"Error: {field}" or last.startswith(f"Error: {field}"), answer["message"]
