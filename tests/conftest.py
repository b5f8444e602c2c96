"""Shared pytest wiring. Service fixtures (S3 server, MLflow server, Ray cluster, Inception
weights) live in tests/fixtures/*.py, one module per service, and are registered here."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

pytest_plugins: list[str] = [
    "tests.fixtures.stack",
    "tests.fixtures.s3",
    "tests.fixtures.fashion",
    "tests.fixtures.inception",
]
