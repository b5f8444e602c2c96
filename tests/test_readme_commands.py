"""Every command in README.md's shell code blocks is run by some test (issue 17), so a README
line cannot silently rot again.

COVERAGE maps each command (as the README shows it, continuation lines joined, the trailing
comment dropped) to the test that runs it; that test's docstring quotes the command. Commands
that need machines this project's CI cannot have are in DOC_ONLY, with the reason. The check is
static (the README and the test files are parsed, nothing runs), so it costs nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

E2E = "tests/test_train_e2e.py"
SERVE_PYFUNC = "tests/test_serve_pyfunc.py"
SERVE_RAY = "tests/test_serve_ray.py"
COVERAGE = {
    "make quickstart":
        "tests/test_infra.py::test_quickstart_trains_and_registers_a_model",
    "python pipelines/prepare_data.py fashion-mnist data/fashion-mnist-32 --image-size 32":
        "tests/test_data_prepare.py::test_readme_prepare_commands",
    "python pipelines/prepare_data.py cifar10:/data/cifar-10-python.tar.gz "
    "s3://my-bucket/cifar10-32":
        "tests/test_data_prepare.py::test_readme_prepare_commands",
    "python pipelines/prepare_data.py imagefolder:/data/imagenet/train s3://my-bucket/in128 "
    "--image-size 128":
        "tests/test_data_prepare.py::test_readme_prepare_commands",
    "python pipelines/index_data.py 's3://my-bucket/ds/train-{000000..001023}.tar'":
        "tests/test_foreign_e2e.py::test_index_data_scans_shards_as_ray_tasks",
    "python pipelines/train.py --config configs/sagan64.yaml "
    "'data.path=s3://my-bucket/ds/train-{000000..001023}.tar' model.num_classes=1000":
        "tests/test_foreign_e2e.py::test_foreign_shards_train_a_registered_model_via_ray_job",
    "python pipelines/train.py":
        "tests/test_embedded_default.py::test_readme_embedded_default_on_a_fresh_copy",
    "python pipelines/train.py --config configs/sagan32.yaml train.steps=5000 --workers 2":
        f"{E2E}::test_readme_sagan32_two_workers",
    "python pipelines/tune.py --config configs/sweep_placement.yaml":
        "tests/test_tune.py::test_readme_placement_sweep",
    "python pipelines/tune.py --config configs/results_attention.yaml":
        "tests/test_tune.py::test_results_sweep_runs_every_trial_to_the_end_and_writes_the_report",
    "ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/tune.py "
    "--config configs/sweep_placement.yaml":
        "tests/test_tune.py::test_sweep_asha_mlflow_and_resume",
    "python pipelines/evaluate.py --model models:/sagan-fashion-quickstart@latest --data "
    "data/fashion-mnist-32-test --num-samples 5000 --out metrics.json":
        "tests/test_embedded_default.py::test_readme_embedded_default_on_a_fresh_copy",
    "python pipelines/sample.py --model runs/quickstart/checkpoint_XXX/checkpoint.pt --out "
    "grid.png --attention-out attention.png --query 8,8 --query 20,12":
        "tests/test_embedded_default.py::test_readme_embedded_default_on_a_fresh_copy",
    "infra/local/up && source .state/env":
        "tests/test_infra.py::test_up_healthy_up_again_down_leaves_nothing",
    "ray job submit --working-dir . -- python pipelines/train.py --config "
    "configs/quickstart.yaml data.path=s3://$SAGAN_DATA_BUCKET/fashion-mnist-32":
        f"{E2E}::test_job_trains_logs_and_registers",
    "infra/local/down":
        "tests/test_infra.py::test_up_healthy_up_again_down_leaves_nothing",
    "mlflow models serve -m models:/sagan-fashion-quickstart@champion --env-manager local "
    "-p 5001":
        f"{SERVE_PYFUNC}::test_readme_mlflow_models_serve_draws_pngs",
    "curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d "
    "'{\"dataframe_records\": [{\"class_id\": 3, \"seed\": 7, \"truncation\": 0.7}]}'":
        f"{SERVE_PYFUNC}::test_readme_mlflow_models_serve_draws_pngs",
    "serve run pipelines.serve:app model=models:/sagan-fashion-quickstart@champion":
        f"{SERVE_RAY}::test_readme_serve_run_app_builder",
    "curl -s 'localhost:8000/sample?class_id=3&seed=7&truncation=0.7' -o sample.png":
        f"{SERVE_RAY}::test_sample_and_grid",
    "curl -s 'localhost:8000/grid?classes=0,3,7&n=8' -o grid.png":
        f"{SERVE_RAY}::test_sample_and_grid",
}
DOC_ONLY = {
    "make test": "runs this test suite itself (CI runs it as .ci/run)",
    "ray job submit --address http://HEAD:8265 --working-dir . -- python pipelines/train.py "
    "--config configs/sagan128.yaml --workers 8 --gpus-per-worker 1":
        "needs 8 GPUs; the same job submission runs in " + E2E,
    "ray up -y ray_cluster.yaml": "AWS account (tests/test_infra.py validates the YAML)",
    "ray dashboard ray_cluster.yaml &": "AWS cluster from `ray up`",
    "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "
    "'{\"excludes\": [\"/.git/\", \"/.venv/\", \"/.state/\", \"/data/\", \"/runs/\", "
    "\"/mlruns/\"]}' -- python pipelines/train.py --config configs/sagan128.yaml "
    "'data.path=s3://$SAGAN_DATA_BUCKET/imagenet-128' "
    "'cluster.storage_path=s3://$SAGAN_DATA_BUCKET/ray-results'":
        "AWS cluster from `ray up` with GPU workers",
    "ray down -y ray_cluster.yaml": "AWS cluster from `ray up`",
}
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)


def _drop_comment(line: str) -> str:
    """`cmd   # note` -> `cmd` (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _normalize(text: str) -> str:
    return " ".join(text.split())


def readme_commands(text: str) -> list[str]:
    """The commands of every shell block: continuation lines joined, comments dropped."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        pending = ""
        for raw in block.splitlines():
            line = _drop_comment(raw)
            if pending or line.strip():
                joined = pending + " " + line.strip() if pending else line.strip()
                if joined.endswith("\\"):
                    pending = joined[:-1].rstrip()
                    continue
                pending = ""
                if joined:
                    commands.append(_normalize(joined))
    return commands


def _docstrings(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    return {node.name: ast.get_docstring(node) or "" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef)}


def test_readme_parser_joins_lines_and_drops_comments() -> None:
    text = ("```bash\nmake x   # why\npython a.py \\\n    --b 'c # d'  # note\n```\n"
            "```python\nimport os\n```\n")
    assert readme_commands(text) == ["make x", "python a.py --b 'c # d'"]


def test_every_readme_command_is_run_by_a_test_that_names_it() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15  # the parser found the README's blocks
    missing = [c for c in commands if c not in COVERAGE and c not in DOC_ONLY]
    assert not missing, f"README commands no test runs (add one to COVERAGE): {missing}"
    stale = [c for c in [*COVERAGE, *DOC_ONLY] if c not in commands]
    assert not stale, f"COVERAGE/DOC_ONLY entries no longer in README.md: {stale}"
    assert len(DOC_ONLY) <= 6, "keep the documentation-only list short"
    cache: dict[str, dict[str, str]] = {}
    for command, target in COVERAGE.items():
        file, name = target.split("::")
        docs = cache.setdefault(file, _docstrings(ROOT / file))
        assert name in docs, f"{target} (for `{command}`) does not exist"
        assert _normalize(command) in _normalize(docs[name]), \
            f"{target}'s docstring does not name the README command `{command}`"
