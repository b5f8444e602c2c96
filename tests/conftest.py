"""Shared pytest wiring. Service fixtures (S3 server, MLflow server, Ray cluster, Inception
weights) live in tests/fixtures/*.py, one module per service, and are registered here."""

import os
import signal


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# SIGTERM (`timeout`, a CI runner giving up) stops the run as Ctrl-C does: pytest then tears
# down the session fixtures, which stop the servers and stacks they started. By default
# SIGTERM would end pytest on the spot and orphan them.
signal.signal(signal.SIGTERM, _interrupt)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

pytest_plugins: list[str] = [
    "tests.fixtures.stack",
    "tests.fixtures.s3",
    "tests.fixtures.fashion",
    "tests.fixtures.inception",
    "tests.fixtures.champion",
]
