"""Issue 14: what a researcher sees in the MLflow UI after a job, checked in a real browser.

A tiny `ray job submit ... pipelines/train.py` on the test stack (real Ray, SeaweedFS S3, MLflow
server with sqlite), then Playwright drives the Debian `chromium` binary (no browser download)
through the run page and the model version page. Screenshots go to $SAGAN_UI_SCREENSHOTS when
set (docs/img/ holds the ones the README links), else to the test's tmp dir.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.stack import JOB_TINY, ROOT, runs_named, submit_job

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
STEPS = 6
UI_TIMEOUT_MS = 120_000  # the UI's first load on a busy 2-core machine takes a while


def _chart(page, title: str):
    """The chart card titled `title` on a run's metrics tab (found through the chart search:
    the tab only renders the cards in view)."""
    page.get_by_placeholder("Search metric charts").fill(title)
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.locator(f'h4[title="{title}"]'))
    card.wait_for(timeout=UI_TIMEOUT_MS)
    return card


def _image_at_last_step(page, title: str, last: int, shot: Path) -> str:
    """Move the image chart's step slider to its end; returns the shown image's URL once it
    has loaded (the same check a user makes by looking)."""
    from playwright.sync_api import expect

    card = _chart(page, title)
    slider = card.get_by_role("slider")
    expect(slider).to_have_attribute("aria-valuemax", str(last))
    track = card.locator("span.TRACK")
    box = track.bounding_box()
    track.click(position={"x": box["width"] - 1, "y": box["height"] / 2})  # its right end
    expect(slider).to_have_attribute("aria-valuenow", str(last))
    img = card.locator("img")
    img.wait_for(timeout=UI_TIMEOUT_MS)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(),
                           timeout=UI_TIMEOUT_MS)
    card.locator('button[data-component-id="fullscreen_button_chartcard"]').click()
    dialog = page.get_by_role("dialog")
    big = dialog.locator("img")
    big.scroll_into_view_if_needed()
    # the image, its title and the slider at the last step (MLflow prints the run's params
    # above the image; they are left out of the picture)
    top, bottom = big.bounding_box(), dialog.get_by_role("slider").bounding_box()
    frame = dialog.bounding_box()
    page.screenshot(path=str(shot), clip={
        "x": frame["x"], "y": max(frame["y"], top["y"] - 24), "width": frame["width"],
        "height": bottom["y"] + 40 - max(frame["y"], top["y"] - 24)})
    page.keyboard.press("Escape")
    return img.get_attribute("src")


@pytest.fixture(scope="module")
def real_shards(local_stack) -> str:
    """A held-out set (Fashion-MNIST test split, 64 images) for eval.real_path."""
    from sagan.data import prepare_dataset

    url = f"s3://{local_stack.bucket}/fashion-test-64"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_stack.environ().items():
            mp.setenv(key, value)
        prepare_dataset("fashion-mnist", url, image_size=32, limit=64, split="test",
                        endpoint_url=local_stack.s3_endpoint)
    return url


def test_run_and_model_pages_show_what_a_researcher_needs(local_stack, stack_shards, real_shards,
                                                        inception_weights, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: apt-get install chromium"
    shots = Path(os.environ.get("SAGAN_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()  # what the submission records
    proc = submit_job(local_stack, [
        "pipelines/train.py", "--config", "configs/quickstart.yaml", *JOB_TINY,
        f"data.path={stack_shards}", f"train.steps={STEPS}", "train.log_every=3",
        "train.ckpt_every=6", "train.sample_every=3", f"train.storage_path={tmp_path / 'runs'}",
        "train.run_name=ui", "tracking.registered_model=ui-gen", "tracking.system_metrics_every=1",
        f"eval.eval_every={STEPS}", f"eval.real_path={real_shards}", "eval.num_samples=64",
        "eval.real_samples=64", "eval.batch_size=32",
        f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}"],
        timeout=1200)  # ~3 min on a quiet 2-core machine; generous for a busy one
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the terminal: one progress line per log step with an ETA, no per-report dumps
    assert f"step {STEPS}/{STEPS} (100%)" in out and " img/s ETA " in out, out[-3000:]
    assert "Reporting training result" not in out, out[-3000:]

    (run,) = runs_named(local_stack, "ui")
    run_id, exp_id = run.info.run_id, run.info.experiment_id
    client = MlflowClient(local_stack.mlflow_uri)
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["sagan.git.dirty"] in ("true", "false")
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs["training"].name == "fashion-600" and inputs["evaluation"].name == \
        "fashion-test-64"
    assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    version = client.get_model_version_by_alias("ui-gen", "champion")
    fid = client.get_metric_history(run_id, "fid")
    assert [m.step for m in fid] == [STEPS]  # once, not again when linked to the model
    model = client.get_logged_model(version.source[len("models:/"):])
    linked = {m.key: m for m in model.metrics}
    assert linked["fid"].value == fid[0].value and linked["fid"].step == STEPS
    assert linked["fid"].dataset_name == "fashion-test-64" and "kid" in linked

    base = local_stack.mlflow_uri.rstrip("/")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(UI_TIMEOUT_MS)

        # Overview: the datasets, the code version, the registered model
        page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
        page.get_by_text("About this run").wait_for()
        page.get_by_text("fashion-600").first.wait_for()
        main = page.locator("main").inner_text()
        assert "fashion-600" in main and "Training" in main, main[-2000:]
        assert head[:7] in main and "train.py" in main, main[-2000:]
        assert "ui-gen" in main, main[-2000:]
        close = page.get_by_role("button", name="Close")  # the assistant side panel
        if close.count():
            close.first.click()
        page.screenshot(path=str(shots / "run-overview.png"), full_page=True)

        # Model metrics: samples and attention as image charts at the last step, FID chart
        page.get_by_role("tab", name="Model metrics").click()
        src = _image_at_last_step(page, "samples", STEPS, shots / "run-samples.png")
        assert f"step%2B{STEPS}%2B" in src, src
        src = _image_at_last_step(page, "attention/16", STEPS, shots / "run-attention.png")
        assert "attention" in src and f"step%2B{STEPS}%2B" in src, src
        card = _chart(page, "fid")
        card.locator("svg").first.wait_for()  # FID is logged once (last step): a one-point chart
        card.screenshot(path=str(shots / "run-fid.png"))

        # System metrics: MLflow's monitor logged CPU and memory while the job ran
        page.get_by_placeholder("Search metric charts").fill("")
        page.get_by_role("tab", name="System metrics").click()
        cpu = _chart(page, "system/cpu_utilization_percentage")
        cpu.locator("svg").first.wait_for()
        cpu.screenshot(path=str(shots / "run-system-metrics.png"))

        # The model version: alias, description (scores, step, dataset, config), tags
        page.goto(f"{base}/#/models/ui-gen/versions/{version.version}")
        page.get_by_text("SAGAN generator (EMA weights)").wait_for()
        main = page.locator("main").inner_text()
        assert "champion" in main, main[:2000]
        assert f"at step {STEPS} of {STEPS}" in main and "FID " in main, main[:2000]
        assert "fashion-600" in main and "attention G [16]" in main, main[:2000]
        page.screenshot(path=str(shots / "model-version.png"), full_page=True)
        browser.close()
