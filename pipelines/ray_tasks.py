"""Data jobs fanned out as Ray tasks: the `map_fn` that `sagan.data.build_index` and
`sagan.data.prepare_dataset` accept, with one progress bar on the driver.

A task is one shard (index) or a few shards (preparation): small enough that a lost worker
costs one re-run of one task (Ray retries it, `max_retries`), large enough that scheduling
(~1 ms a task) is noise next to its I/O and encoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

TASK_RETRIES = 3  # a task whose worker or node died runs again elsewhere


def use_ray(flag: bool | None) -> bool:
    """--ray / --no-ray, else: a cluster is named by RAY_ADDRESS (the local stack's env file
    and `ray job submit` set it). An http:// job-server address is not a cluster to join."""
    if flag is not None:
        return flag
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return bool(address) and not address.startswith(("http://", "https://"))


def cluster_cpus() -> int:
    """CPUs of the Ray cluster (connecting first): how many tasks can run at once."""
    import ray

    from pipelines.ray_cluster import connect

    connect()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ray_map(desc: str, unit: str = "shard", cpus: float = 1.0,
            weight: Callable[[tuple], int] | None = None, progress: bool = True
            ) -> Callable[[Callable[..., Any], list[tuple]], Iterator[Any]]:
    """A `map_fn(fn, jobs)` that runs `fn(*job)` as Ray tasks (connecting to the cluster
    first: pipelines/ray_cluster.connect) and yields results as they finish. The bar counts
    `weight(job)` per finished job (default 1)."""

    def map_fn(fn: Callable[..., Any], jobs: list[tuple]) -> Iterator[Any]:
        import ray
        from tqdm import tqdm

        from pipelines.ray_cluster import connect

        where = connect()
        cpus_total = ray.cluster_resources().get("CPU", 0)
        print(f"{desc}: {len(jobs)} Ray task(s) on {where} ({cpus_total:g} CPUs)", flush=True)
        remote = ray.remote(num_cpus=cpus, max_retries=TASK_RETRIES)(fn)
        pending = {remote.remote(*job): job for job in jobs}
        total = sum(weight(j) for j in jobs) if weight else len(jobs)
        try:
            with tqdm(total=total, unit=unit, desc=desc, disable=not progress) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    job = pending.pop(done[0])
                    try:
                        result = ray.get(done[0])
                    except ray.exceptions.RayTaskError as exc:  # the task's own error (a
                        raise (exc.cause or exc) from None  # DataError: one line for the CLI)
                    bar.update(weight(job) if weight else 1)
                    yield result
        finally:
            _drain(list(pending))

    return map_fn


def _drain(refs: list) -> None:
    """Cancel tasks nobody will read and collect their outcome, so that a failed run ends
    with its one error line, not with Ray's 'Unhandled error' tracebacks of the others."""
    import ray

    for ref in refs:
        ray.cancel(ref)
    for ref in refs:
        try:
            ray.get(ref, timeout=60)
        except Exception:  # noqa: BLE001 - cancelled or failed the same way: already reported
            pass
