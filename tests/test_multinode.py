"""Issue 15: data-parallel training on a real multi-node Ray cluster, and losing a node.

One module-scoped stack from `infra.local` (the code behind `infra/local/up --nodes 2`): the
SeaweedFS S3 server, the MLflow server (sqlite) and a Ray head with 0 CPUs plus two worker
nodes of 2 CPUs, each its own `ray start --address=... --block` process group (raylet, object
store, agents, workers). With `cluster.cpus_per_worker=2` a node holds exactly one worker, so
two workers are on two nodes, and killing a node's process group (SIGKILL, nothing graceful)
is what losing a spot machine looks like to Ray. A "new node joins" is `up` again, which
restarts the dead node. Checkpoints live in the stack's S3 (shared by all nodes).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from infra.local.config import StackConfig, StackError
from infra.local.processes import read_pid_records
from infra.local.stack import StackInfo, down, up
from tests.fixtures.stack import JOB_TINY, start_driver, sweep_runs

STARTED = re.compile(r"pid=(\d+)\).*\[rank (\d+)\] started: (\d+) worker\(s\), \w+, node (\w+)")
FINISHED = re.compile(r"\[rank (\d+)\] finished step (\d+): G/D/EMA sha256 (\w+)")
RESUMED = re.compile(r"\[rank 0\] resumed from \S+ at step (\d+)")
STEP = re.compile(r"\bstep (\d+)/\d+ \(\d+%\)")
TINY = [*[o for o in JOB_TINY if not o.startswith("train.workers")], "train.sample_every=0",
        "eval.eval_every=0", "cluster.cpus_per_worker=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Head (0 CPUs: drivers, GCS, dashboard, Train controller) + 2 worker nodes of 2 CPUs,
    and 600 Fashion-MNIST images as shards in the stack's S3."""
    from sagan.data import prepare_dataset

    state = tmp_path_factory.mktemp("multinode")
    cfg = StackConfig.with_free_ports(state, ray_num_cpus=0, ray_nodes=2, ray_node_cpus=2,
                                      ray_object_store_mb=256)
    try:
        info = up(cfg, quiet=True)
    except StackError:
        # `ray start` gives its own raylet a hard-coded 30 s to register with the GCS, which a
        # badly overloaded machine can miss; up() stopped what it started, so try once more
        info = up(cfg, quiet=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in info.environ().items():
                mp.setenv(key, value)
            prepare_dataset("fashion-mnist", f"s3://{info.bucket}/fashion-600", image_size=32,
                            limit=600, samples_per_shard=100, endpoint_url=info.s3_endpoint)
        yield info
    finally:
        leftovers = down(state, purge=True, quiet=True)
        assert not any(leftovers.values()), leftovers


def args(info: StackInfo, name: str, *extra: str) -> list[str]:
    return ["--config", "configs/quickstart.yaml", *TINY,
            f"data.path=s3://{info.bucket}/fashion-600",
            f"cluster.storage_path=s3://{info.bucket}/runs", f"cluster.run_name={name}",
            f"tracking.experiment=mn-{name}", *extra]


def groups(text: str) -> list[dict[int, tuple[int, str, int]]]:
    """The worker groups in start order: rank -> (pid, node id, world size)."""
    out: list[dict[int, tuple[int, str, int]]] = []
    for pid, rank, world, node in STARTED.findall(text):
        if not out or int(rank) in out[-1]:  # ranks of one group print in any order
            out.append({})
        out[-1][int(rank)] = (int(pid), node, int(world))
    return out


def _parent(pid: int) -> int:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Ray workers leave the raylet's process group, so
    the group alone is not the whole node)."""
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, pp in parents.items() if pp == pid]
    return out


def node_service(info: StackInfo, pid: int) -> str:
    """The stack service (ray-node-K) whose `ray start` process is an ancestor of `pid`."""
    (name,) = [n for n, r in read_pid_records(info.state_dir).items()
               if n.startswith("ray-node-") and pid in descendants(r.pid)]
    return name


def kill_node(info: StackInfo, service: str) -> float:
    """SIGKILL every process of a worker node at once: its `ray start`, raylet, agents and
    workers (the recorded process group and everything descending from its leader)."""
    rec = read_pid_records(info.state_dir)[service]
    assert rec.group_is_ours()
    victims = set(descendants(rec.pid)) | set(rec.members())
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return time.monotonic()


def wait_line(driver, pattern: re.Pattern, after: int, timeout: float, what: str) -> int:
    """Index of the first output line at or after `after` matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(after, len(driver.lines)):
            if pattern.search(driver.lines[i]):
                return i
        if driver.proc.poll() is not None:
            pytest.fail(f"driver exited ({driver.proc.returncode}) before {what}:\n"
                        + driver.text[-4000:])
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout} s:\n" + driver.text[-4000:])


def loss_steps(info: StackInfo, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    from tests.fixtures.stack import runs_named

    (run,) = runs_named(info, name, experiment=f"mn-{name}")
    client = MlflowClient(info.mlflow_uri)
    return [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")]


@pytest.mark.slow
def test_two_workers_on_two_nodes_stay_identical_and_register(cluster):
    """2 workers with strict_spread land on the 2 worker nodes (different node ids), train
    over gloo between the nodes, end with bit-identical G, D and EMA (sha256 of every
    parameter and buffer, printed by each rank), register the EMA generator and log system
    metrics per node."""
    from mlflow.tracking import MlflowClient

    driver = start_driver(cluster, args(cluster, "two-nodes", "cluster.workers=2",
                                        "cluster.placement=strict_spread", "train.steps=6",
                                        "train.ckpt_every=3", "train.log_every=1",
                                        "tracking.registered_model=mn-gen",
                                        "tracking.system_metrics_every=0.5"))
    assert driver.wait(400) == 0, driver.text[-4000:]
    out = driver.text
    (group,) = groups(out)
    assert sorted(group) == [0, 1] and {w for _, _, w in group.values()} == {2}
    assert group[0][1] != group[1][1], group  # two different Ray nodes
    digests = {int(r): d for r, s, d in FINISHED.findall(out) if int(s) == 6}
    assert sorted(digests) == [0, 1] and digests[0] == digests[1], out[-3000:]
    assert "done: step 6/6" in out
    client = MlflowClient(cluster.mlflow_uri)
    version = client.get_model_version_by_alias("mn-gen", "latest")
    assert version.version == "1"
    # MLflow's system metrics, one node id per Ray node (the first worker of each logs)
    keys = client.get_run(version.run_id).data.metrics
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in keys, sorted(keys)


@pytest.mark.slow
def test_node_loss_shrinks_then_grows_back_elastic(cluster):
    """cluster.workers=[1, 2]: SIGKILL the worker node of rank 1 mid-run. The run goes on
    with 1 worker on the surviving node from the last checkpoint (at most one checkpoint
    interval redone), grows back to 2 workers when the node returns (`up` again), ends at
    exactly train.steps, and MLflow has every step once."""
    steps, every = 120, 10
    driver = start_driver(cluster, args(cluster, "elastic", "cluster.workers=[1,2]",
                                        "cluster.placement=spread", "cluster.resize_interval_s=5",
                                        f"train.steps={steps}", f"train.ckpt_every={every}",
                                        "train.log_every=1", "--no-register"))
    wait_line(driver, re.compile(rf"step {2 * every}/{steps} "), 0, 400, f"step {2 * every}")
    first = groups(driver.text)[0]
    assert sorted(first) == [0, 1] and first[0][1] != first[1][1], first
    victim = node_service(cluster, first[1][0])
    reached = max(int(s) for s in STEP.findall(driver.text))
    mark = len(driver.lines)
    killed_at = kill_node(cluster, victim)

    # shrinks: one worker on the surviving node, resumed from the last checkpoint
    i = wait_line(driver, re.compile(r"started: 1 worker\(s\)"), mark, 300, "a 1-worker group")
    j = wait_line(driver, RESUMED, i, 120, "the 1-worker group's resume")
    resumed_at = int(RESUMED.search(driver.lines[j]).group(1))
    k = wait_line(driver, STEP, j, 120, "a step of the 1-worker group")
    recovery_s = driver.stamps[k] - killed_at
    print(f"\nnode loss: killed {victim} at step >= {reached}; 1 worker resumed at step "
          f"{resumed_at}; training again {recovery_s:.1f} s after the kill")
    assert reached - every <= resumed_at <= reached + every and resumed_at % every == 0

    # grows back when the node returns
    up(cluster.config, quiet=True)
    wait_line(driver, re.compile(r"started: 2 worker\(s\)"), k, 300, "the 2-worker group again")

    assert driver.wait(600) == 0, driver.text[-4000:]
    out = driver.text
    assert f"done: step {steps}/{steps}" in out
    sizes = [g[0][2] for g in groups(out)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    assert loss_steps(cluster, "elastic") == list(range(1, steps + 1))


@pytest.mark.slow
def test_fixed_workers_wait_for_a_node_and_say_why(cluster):
    """cluster.workers=2 (fixed) and a node lost with no spare one: the driver says it waits
    for capacity and why; when the node returns the run resumes on 2 workers and finishes."""
    steps = 40
    driver = start_driver(cluster, args(cluster, "fixed", "cluster.workers=2",
                                        "cluster.placement=spread", f"train.steps={steps}",
                                        "train.ckpt_every=5", "train.log_every=1",
                                        "--no-register"),
                          env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    wait_line(driver, re.compile(rf"step 10/{steps} "), 0, 400, "step 10")
    (first,) = groups(driver.text)
    mark = len(driver.lines)
    kill_node(cluster, node_service(cluster, first[1][0]))
    i = wait_line(driver, re.compile(r"waiting for capacity: cluster\.workers=2 needs 2 "
                                     r"worker\(s\).* hold 1;"), mark, 120, "the waiting line")
    time.sleep(15)  # it really waits: no worker group of another size starts
    assert not re.search(r"started: 1 worker", "\n".join(driver.lines[mark:]))
    up(cluster.config, quiet=True)
    wait_line(driver, re.compile(r"capacity back"), i, 300, "the capacity-back line")
    assert driver.wait(600) == 0, driver.text[-4000:]
    assert f"done: step {steps}/{steps}" in driver.text
    # once it waited, only 2-worker groups started: ranks 0 and 1 of one after the node returned
    after = {(int(r), int(w)) for _, r, w, _ in STARTED.findall("\n".join(driver.lines[i:]))}
    assert {(0, 2), (1, 2)} <= after and {w for _, w in after} == {2}, driver.text[-4000:]
    assert loss_steps(cluster, "fixed") == list(range(1, steps + 1))


@pytest.mark.slow
def test_sweep_two_trials_of_two_workers(cluster, inception_weights, tmp_path):
    """A Tune sweep on the multi-node cluster: 2 trials, each a TorchTrainer of 2 workers
    inside the trial (FID computed across both workers), ASHA on FID, one nested MLflow run per
    trial under the sweep's parent, sweep-best registered."""
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from tests.fixtures.stack import ROOT

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": "configs/quickstart.yaml",
        "overrides": [
            *[o for o in TINY if not o.startswith("cluster.cpus")], "cluster.workers=2",
            "cluster.cpus_per_worker=0.5", "train.steps=4", "train.ckpt_every=2",
            "train.log_every=2", "eval.eval_every=2", "eval.num_samples=16",
            "eval.real_samples=16", "eval.batch_size=8", "eval.metrics=[fid]",
            f"eval.inception_weights={inception_weights}", f"eval.cache_dir={tmp_path / 'fid'}",
            f"data.path=s3://{cluster.bucket}/fashion-600",
            f"eval.real_path=s3://{cluster.bucket}/fashion-600",  # every node reads it
            f"cluster.storage_path=s3://{cluster.bucket}/sweep-runs",
            "tracking.registered_model=mn-sweep-gen", "tracking.experiment=mn-sweep"],
        "search_space": {"lr_d": {"grid": [2.0e-4, 4.0e-4]}},
        "tune": {"name": "mn-sweep", "num_samples": 1, "max_concurrent_trials": 2,
                 "metric": "fid", "mode": "min", "grace_period": 1, "reduction_factor": 2,
                 "storage_path": str(tmp_path / "tune")},
    }))
    proc = subprocess.run([sys.executable, "pipelines/tune.py", "--config", str(sweep)],
                          env={**cluster.environ(), "RAY_DEDUP_LOGS": "0"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "sweep mn-sweep: 2 trials" in out
    started = STARTED.findall(out)
    assert len(started) == 4 and {w for _, _, w, _ in started} == {"2"}, started

    analysis = ExperimentAnalysis(str(tmp_path / "tune" / "mn-sweep"))
    trials = {t.trial_id: t for t in analysis.trials}
    assert len(trials) == 2
    for t in trials.values():  # ASHA saw FID at the rungs (steps 2, 4) of every trial
        df = analysis.trial_dataframes[t.trial_id]
        assert df["fid"].notna().sum() >= 1 and set(df["step"].astype(int)) <= {2, 4}

    client = MlflowClient(cluster.mlflow_uri)
    _, children = sweep_runs(cluster, "mn-sweep", experiment="mn-sweep")
    assert {c.data.tags["sagan.trial_id"] for c in children} == set(trials)
    best_tid = min(trials, key=lambda tid: trials[tid].last_result["fid"])
    best = client.get_model_version_by_alias("mn-sweep-gen", "sweep-best")
    assert best.run_id == {c.data.tags["sagan.trial_id"]: c for c in children}[best_tid] \
        .info.run_id


# --------------------------------------------------------------------------- config (no cluster)


def test_elastic_workers_placement_and_global_batch_config():
    """`cluster.workers: [min, max]` (also as train.workers) becomes ScalingConfig's (min, max);
    the global batch must split evenly at every size in the range; bad values are one line."""
    from pipelines.config import load_run_config
    from sagan.config import ConfigError

    cfg = load_run_config(None, ["train.workers=[1,2]", "train.placement=spread",
                                 "train.batch_size=16"])
    assert cfg.cluster.num_workers() == (1, 2) and cfg.cluster.placement == "spread"
    assert load_run_config(None, ["cluster.workers=2"]).cluster.num_workers() == 2
    for overrides, message in [
        (["cluster.workers=[1,3]", "train.batch_size=16"], "'train.batch_size': 16 is not "
         "divisible by every world size in cluster.workers=[1, 3] (not by 3)"),
        (["cluster.workers=[2,1]"], "'cluster.workers': must be >= 1 (and min <= max)"),
        (["cluster.workers=[1,2,3]"], "'cluster.workers': must be N or [min, max]"),
        (["cluster.workers=two"], "'cluster.workers': expected int or list"),
        (["cluster.placement=anywhere"], "'cluster.placement': must be one of pack, spread, "
         "strict_spread"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_run_config(None, overrides)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_node_local_storage_refused_on_several_nodes():
    """With more than one node, checkpoints on a node-local path are refused in one line,
    unless the user declares the path shared; s3:// always passes."""
    from pipelines.config import load_run_config
    from pipelines.preflight import PreflightError, refuse_local_storage_on_many_nodes

    local = load_run_config(None, ["cluster.storage_path=/tmp/runs"])
    refuse_local_storage_on_many_nodes(local, 1)
    with pytest.raises(PreflightError, match=r"cluster.storage_path '/tmp/runs' is node-local "
                                             r"and the Ray cluster has 3 nodes"):
        refuse_local_storage_on_many_nodes(local, 3)
    refuse_local_storage_on_many_nodes(
        load_run_config(None, ["cluster.storage_path=/nfs/runs", "cluster.shared_storage=true"]), 3)
    refuse_local_storage_on_many_nodes(
        load_run_config(None, ["cluster.storage_path=s3://b/runs"]), 3)
