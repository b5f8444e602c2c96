"""Wall time of one in-training evaluation (FID + KID) on 1 worker vs 2, as the train loop runs it.

    python -m bench.eval_scaling                       # 1,000 generated vs 1,000 held-out, 32 px
    python -m bench.eval_scaling --num-samples 200 --out /tmp/eval.json
    python -m bench.eval_scaling --workers 2 --runtimes torch,auto   # Inception runtime, as trained

`sagan.eval.compute_metrics` shares the work over the torch.distributed group: each rank
generates and featurises its share of eval.num_samples (and, on a real-feature cache miss, of
the real set), rank 0 scores. Both sides here run the same call as the training workers do (one
process per worker, one thread each, gloo), on the same generator and the same held-out shards,
alternating 1 and 2 workers, each rep with a cold real-feature cache (the first evaluation of a
run) and then a warm one (every later evaluation). The baseline is 1 worker; the ratio is
t(1 worker) / t(2 workers), so > 1 means the second worker helps. Needs the standard Inception
weights (`make inception-weights`); the FIDs of both sides must agree. With `--runtimes
torch,auto` the same runs are repeated per `eval.runtime` and the ratio t(torch) / t(other) is
printed too: the in-training view of bench/inception_speed.py (workers share the node's cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import RESULTS, environment, write_json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.local.config import free_port
from sagan.config import EvalConfig, load_config
from sagan.eval import compute_metrics
from sagan.models import Generator
# isort: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=1000, help="generated and real images")
    p.add_argument("--reps", type=int, default=2, help="alternating reps per world size")
    p.add_argument("--source", default="fashion-mnist", help="prepare_dataset source spec")
    p.add_argument("--workers", default="1,2", help="world sizes to run (default 1,2)")
    p.add_argument("--runtimes", default="torch",
                   help="eval.runtime values to run, the first is the baseline (default torch)")
    p.add_argument("--out", default=str(RESULTS / "eval_scaling.json"))
    return p.parse_args(argv)


def _worker(rank: int, world: int, port: int, state: dict, model_cfg, eval_cfg: EvalConfig,
            real: str, out: dict) -> None:
    torch.set_num_threads(1)  # as a training worker with cluster.cpus_per_worker=1
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        dist.barrier()
    G = Generator(model_cfg)
    G.load_state_dict(state)
    t0 = time.perf_counter()
    metrics = compute_metrics(G, eval_cfg, real=real, num_classes=model_cfg.num_classes)
    if rank == 0:
        out["wall_s"], out["metrics"] = time.perf_counter() - t0, metrics
    if world > 1:
        dist.destroy_process_group()


def timed(world: int, state: dict, model_cfg, eval_cfg: EvalConfig, real: str) -> dict:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), state, model_cfg, eval_cfg, real, out),
             nprocs=world, join=True)
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sagan.data import prepare_dataset

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    torch.manual_seed(0)
    state = Generator(cfg.model).state_dict()
    worlds = [int(w) for w in args.workers.split(",")]
    runtimes = args.runtimes.split(",")
    results: dict[str, list[dict]] = {f"{rt}/{w}": [] for rt in runtimes for w in worlds}
    with tempfile.TemporaryDirectory(prefix="sagan-bench-eval-") as tmp:
        real = str(Path(tmp) / "heldout")
        prepare_dataset(args.source, real, image_size=cfg.model.image_size,
                        channels=cfg.model.channels, split="test", limit=args.num_samples)
        for rep in range(args.reps):
            order = [(rt, w) for rt in runtimes for w in worlds]
            for rt, world in (order if rep % 2 == 0 else order[::-1]):
                for cache in ("cold", "warm"):
                    eval_cfg = EvalConfig(num_samples=args.num_samples,
                                          real_samples=args.num_samples, batch_size=50,
                                          metrics=["fid", "kid"], runtime=rt,
                                          cache_dir=str(Path(tmp) / f"cache-{rep}-{rt}-{world}"))
                    r = timed(world, state, cfg.model, eval_cfg, real)
                    results[f"{rt}/{world}"].append({"rep": rep, "cache": cache, **r})
                    print(f"rep {rep} runtime={rt} workers={world} cache={cache}: "
                          f"{r['wall_s']:.1f} s fid={r['metrics']['fid']:.3f}", flush=True)
    summary: dict[str, dict] = {}
    for key, rs in results.items():
        for cache in ("cold", "warm"):
            summary.setdefault(key, {})[f"{cache}_s"] = round(
                statistics.median(r["wall_s"] for r in rs if r["cache"] == cache), 2)
    for rt in runtimes:
        for cache in ("cold", "warm"):
            if len(worlds) > 1:
                t1, t2 = (summary[f"{rt}/{w}"][f"{cache}_s"] for w in worlds[:2])
                print(f"{rt}, {cache} real cache: {worlds[0]} worker(s) {t1:.1f} s, {worlds[1]} "
                      f"{t2:.1f} s -> ratio {t1 / t2:.2f}x (baseline: {worlds[0]}, same run)")
            if rt != runtimes[0]:
                for w in worlds:
                    base = summary[f"{runtimes[0]}/{w}"][f"{cache}_s"]
                    t = summary[f"{rt}/{w}"][f"{cache}_s"]
                    summary[f"{rt}/{w}"][f"{cache}_ratio_vs_{runtimes[0]}"] = round(base / t, 3)
                    print(f"{w} worker(s), {cache} real cache: {runtimes[0]} {base:.1f} s, {rt} "
                          f"{t:.1f} s -> ratio {base / t:.2f}x (baseline: {runtimes[0]}, same run)")
    fids = {round(r["metrics"]["fid"], 3) for rs in results.values() for r in rs}
    print(f"FID on all sides: {sorted(fids)} (must agree)")
    path = write_json(args.out, {"benchmark": "eval_scaling", "num_samples": args.num_samples,
                                 "summary": summary, "runs": results,
                                 "environment": environment(torch.device("cpu")),
                                 "threads_per_worker": 1, "cpu_count": os.cpu_count()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
