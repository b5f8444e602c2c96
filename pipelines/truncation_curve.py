"""FID / precision / recall of a generator against the truncation threshold, as a PNG and a table.

    python pipelines/truncation_curve.py --model ckpt.pt --data data/fashion-mnist-32-test \\
        --out-dir curves/ --truncations 0.25,0.5,0.75,1,1.5,2,none

The truncation trick (BigGAN, Brock et al. 2019) redraws latent entries with |z| > t: smaller t
moves samples towards the mode, raising precision (fidelity) and lowering recall (variety);
FID usually has a minimum in between. One row per t (`none`: untruncated, the default
sampling), every row on the same seed, real set and protocol, so the curve shows only what t
changes: the real set's features are computed once (cached), each t costs sampling plus
Inception on the generated images. Writes `truncation_curve.png`, `truncation_curve.csv` and
`truncation_curve.json` (rows + protocol) into --out-dir. Bad input ends with one line on
stderr naming the flag, exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_TRUNCATIONS = "0.25,0.5,0.75,1,1.5,2,none"


def parse_truncations(text: str) -> list[float | None]:
    """'0.5,1,none' -> [0.5, 1.0, None] (None: untruncated)."""
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "none":
            out.append(None)
            continue
        try:
            t = float(part)
        except ValueError:
            t = -1.0
        if not 0 < t < float("inf"):
            raise argparse.ArgumentTypeError(f"--truncations '{text}': each entry must be a "
                                             f"number > 0 or 'none', got '{part}'")
        out.append(t)
    if not out:
        raise argparse.ArgumentTypeError("--truncations: empty")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="FID / precision / recall against the truncation threshold t (BigGAN's "
                    "truncation trick): writes a PNG, a CSV and a JSON table with the protocol.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python pipelines/truncation_curve.py --model ckpt.pt --data "
               "data/fashion-mnist-32-test --out-dir curves/")
    p.add_argument("--model", required=True, metavar="SRC",
                   help="checkpoint file/dir, or MLflow URI models:/NAME@ALIAS, runs:/ID/generator")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="real set: shard dir, s3://bucket/prefix or http(s):// prefix")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where the PNG and tables go")
    p.add_argument("--truncations", type=parse_truncations, default=DEFAULT_TRUNCATIONS,
                   metavar="LIST", help=f"comma list of t > 0 or 'none' (default "
                                        f"{DEFAULT_TRUNCATIONS})")
    p.add_argument("--metrics", default="fid,prc", metavar="LIST",
                   help="metrics per point (default fid,prc: FID, precision, recall)")
    p.add_argument("--config", metavar="YAML", help="config whose eval section to use")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--num-samples", type=int, metavar="N", help="generated images per point")
    p.add_argument("--real-samples", type=int, metavar="N", help="real images")
    p.add_argument("--batch-size", type=int, metavar="N", help="eval.batch_size")
    p.add_argument("--inception-weights", metavar="PATH", help="eval.inception_weights")
    p.add_argument("--cache-dir", metavar="DIR", help="real-feature cache (eval.cache_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// data")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ sources")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.truncation = None  # evaluate.build_config reads it
    return args


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """FID on the left axis, precision / recall on the right, against t ('none' at the right
    end, drawn as a separate marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if r["truncation"] is not None]
    far = max([r["truncation"] for r in finite], default=1.0) * 1.25
    xs = [r["truncation"] if r["truncation"] is not None else far for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if "fid" in rows[0]:
        ax.plot(xs, [r["fid"] for r in rows], "o-", color="black", label="FID")
        ax.set_ylabel("FID (lower is better)")
    twin = ax.twinx()
    for key, color in (("precision", "tab:blue"), ("recall", "tab:orange"),
                       ("density", "tab:green"), ("coverage", "tab:red")):
        if key in rows[0]:
            twin.plot(xs, [r[key] for r in rows], "s--", color=color, label=key)
    twin.set_ylim(0, max(1.05, *(r.get("density", 0) for r in rows)))
    ticks = sorted(set(xs))
    has_none = len(finite) < len(rows)
    ax.set_xticks(ticks, ["none" if has_none and x == far else f"{x:g}" for x in ticks])
    ax.set_xlabel("truncation t (|z| entries > t redrawn)")
    ax.set_title(title, fontsize=9)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper center",
              framealpha=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.evaluate import build_config
    from pipelines.model_io import ModelSourceError, load_generator_any, resolve_device
    from pipelines.tracking import TrackingError
    from sagan.checkpoint import CheckpointError
    from sagan.config import ConfigError
    from sagan.data import DataError
    from sagan.eval import (
        InceptionWeightsError,
        RealDataError,
        evaluate_generator,
        score_keys,
    )

    known = (ConfigError, ModelSourceError, CheckpointError, DataError, InceptionWeightsError,
             RealDataError, FileNotFoundError, TrackingError)
    rows: list[dict[str, Any]] = []
    protocol: dict[str, str] = {}
    try:
        device = resolve_device(args.device)
        G, _model_cfg, ckpt_cfg = load_generator_any(args.model, device,
                                                     tracking_uri=args.tracking_uri)
        cfg = build_config(args, ckpt_cfg)
        for t in args.truncations:
            result = evaluate_generator(G, cfg.eval, real=args.data, device=device,
                                        endpoint_url=args.endpoint_url, seed=args.seed,
                                        progress=not args.no_progress, truncation=t)
            rows.append({"truncation": t, **{k: result.scores[k]
                                             for k in score_keys(cfg.eval.metrics)
                                             if k in result.scores}})
            protocol = {k: v for k, v in result.protocol.items()
                        if k != "protocol.truncation" and k != "protocol.id"}
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rows[-1].items()), flush=True)
    except known as exc:
        print(f"truncation_curve.py: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "truncation_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "truncation": "none" if r["truncation"] is None
                          else r["truncation"]} for r in rows)
    (out / "truncation_curve.json").write_text(json.dumps(
        {"model": args.model, "data": args.data, "rows": rows, "protocol": protocol},
        indent=2) + "\n")
    plot(rows, out / "truncation_curve.png",
         f"{Path(args.model).name}: {protocol.get('protocol.generated_count')} generated vs "
         f"{protocol.get('protocol.real_count')} real ({protocol.get('protocol.real_set')})")
    for name in ("png", "csv", "json"):
        print(f"wrote {out / f'truncation_curve.{name}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
