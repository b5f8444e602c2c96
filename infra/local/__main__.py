"""Command line of the local stack: `python -m infra.local {up,down,status}`.

`infra/local/up` and `infra/local/down` are the same commands with the repo venv's Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from infra.local.config import StackConfig, StackError, load_config, resolve_state_dir
from infra.local.processes import exit_on_sigterm, read_pid_records, state_lock
from infra.local.stack import down, status, up


def _config_from_args(args: argparse.Namespace) -> StackConfig:
    """Explicit options > the config recorded in the state dir > defaults (or free ports)."""
    state = resolve_state_dir(args.state_dir)
    recorded = load_config(state)
    running = any(r.leader_alive() for r in read_pid_records(state).values())
    if args.free_ports and not running:  # a running stack keeps its ports
        base = StackConfig.with_free_ports(state)
    else:
        base = recorded or StackConfig(state_dir=state)
    overrides = {k: v for k, v in {
        "s3_port": args.s3_port, "mlflow_port": args.mlflow_port,
        "ray_gcs_port": args.ray_port, "ray_dashboard_port": args.dashboard_port,
        "ray_num_cpus": args.num_cpus, "ray_object_store_mb": args.object_store_mb,
        "ray_nodes": args.nodes, "ray_node_cpus": args.node_cpus,
        "bucket": args.bucket,
    }.items() if v is not None}
    return dataclasses.replace(base, **overrides)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infra.local",
        description="Local stack on 127.0.0.1: S3 (SeaweedFS, data on disk), MLflow server "
                    "(sqlite, artifacts proxied to S3) and a Ray head with the job server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  infra/local/up && source .state/env\n"
               "  infra/local/up --free-ports --state-dir /tmp/mystack\n"
               "  infra/local/up --nodes 2 --num-cpus 0 --node-cpus 2   # head + 2 worker nodes\n"
               "  python -m infra.local status --json\n"
               "  infra/local/down                # stop; S3 objects, MLflow DB and logs stay\n"
               "  infra/local/down --purge        # ... and delete them\n")
    sub = p.add_subparsers(dest="command", required=True)

    def add_state(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--state-dir", default=None,
                        help="state directory (default: $SAGAN_STATE_DIR or <repo>/.state)")

    up_p = sub.add_parser("up", help="start the stack (no-op for services already healthy)")
    add_state(up_p)
    up_p.add_argument("--s3-port", type=int, help="S3 port (default 9000)")
    up_p.add_argument("--mlflow-port", type=int, help="MLflow server port (default 5000)")
    up_p.add_argument("--ray-port", type=int, help="Ray GCS port (default 6379)")
    up_p.add_argument("--dashboard-port", type=int,
                      help="Ray dashboard / job server port (default 8265)")
    up_p.add_argument("--free-ports", action="store_true",
                      help="when the stack is not running, pick free ports for everything "
                           "(incl. Ray's internal ports) instead of the defaults/recorded ones")
    up_p.add_argument("--num-cpus", type=int, help="logical CPUs Ray offers (default: cores)")
    up_p.add_argument("--object-store-mb", type=int,
                      help="Ray object store size per node (default 1024)")
    up_p.add_argument("--nodes", type=int, metavar="N",
                      help="Ray worker nodes beside the head, each its own raylet on this "
                           "machine (default 0; a multi-node cluster for elastic training)")
    up_p.add_argument("--node-cpus", type=int,
                      help="logical CPUs each worker node offers (default 1)")
    up_p.add_argument("--bucket", help="S3 bucket for data and MLflow artifacts (default sagan)")
    up_p.add_argument("--timeout", type=float, default=180.0,
                      help="seconds to wait for health (default 180)")
    up_p.add_argument("--quiet", action="store_true", help="print only errors")

    down_p = sub.add_parser("down", help="stop exactly the processes `up` started")
    add_state(down_p)
    down_p.add_argument("--purge", action="store_true",
                        help="also delete the state dir (S3 objects, MLflow DB, logs) and "
                             "Ray's temp dir")
    down_p.add_argument("--quiet", action="store_true")

    st_p = sub.add_parser("status", help="show each service; exit 0 only if all are healthy")
    add_state(st_p)
    st_p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "up":
            exit_on_sigterm()  # killed while starting: stop what was started (see up())
            # Resolve the config under the state lock (up() takes it again: re-entrant): a
            # concurrent `up` may be recording the stack right now.
            with state_lock(resolve_state_dir(args.state_dir)):
                up(_config_from_args(args), timeout=args.timeout, quiet=args.quiet)
            return 0
        if args.command == "down":
            leftovers = down(args.state_dir, purge=args.purge, quiet=args.quiet)
            return 1 if any(leftovers.values()) else 0
        report = status(args.state_dir)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for service, s in report.items():
                state = "healthy" if s["healthy"] else ("UNHEALTHY" if s["running"] else "down")
                extra = "" if s["healthy"] else f"  ({s['detail']})"
                print(f"{service:10} {state:9} pid={s['pid']}  {s['address']}{extra}")
        return 0 if all(s["healthy"] for s in report.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
