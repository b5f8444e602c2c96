"""Draw a sample grid (and optionally attention maps) from a SAGAN generator.

    python pipelines/sample.py --model models:/sagan-generator@latest --out grid.png
    python pipelines/sample.py --model ckpt.pt --out grid-t0.5.png --truncation 0.5
    python pipelines/sample.py --model runs/sagan/checkpoint_000004/checkpoint.pt --out grid.png \\
        --attention-out attention.png --query 8,8 --query 20,12 --seed 3

The grid uses fixed z from --seed (one row per class when the model is conditional); the
attention figure shows, for each --query Y,X pixel, where each attention layer looks (one panel
per query point and layer, as in the SAGAN paper's figure 1). Bad input ends with one line on
stderr, exit code 2. See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_query(text: str) -> tuple[int, int]:
    """'Y,X' -> (y, x) image pixel coordinates."""
    parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--query '{text}': expected Y,X pixel coordinates, "
                                         "e.g. 8,8") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample grid and attention-map figure from a SAGAN generator.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python pipelines/sample.py --model models:/sagan-generator@latest "
               "--out grid.png\n"
               "  python pipelines/sample.py --model ckpt.pt --out grid.png "
               "--attention-out attn.png --query 8,8 --query 20,12")
    p.add_argument("--model", required=True, metavar="SRC",
                   help="checkpoint file/dir, or MLflow URI models:/NAME@ALIAS, runs:/ID/generator")
    p.add_argument("--out", required=True, metavar="PNG", help="sample grid output")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed z (default 0)")
    p.add_argument("--n-per-class", type=int, default=8,
                   help="columns per class row, conditional models (default 8)")
    p.add_argument("--n", type=int, default=64, help="samples, unconditional models (default 64)")
    p.add_argument("--truncation", type=float, metavar="T",
                   help="truncation trick: redraw every |z| entry > T (BigGAN), trading "
                        "variety for fidelity (default: none, plain N(0, 1))")
    p.add_argument("--classes", metavar="LIST",
                   help="comma list of class ids to show (default: all)")
    p.add_argument("--attention-out", metavar="PNG", help="also write an attention-map figure")
    p.add_argument("--query", type=parse_query, action="append", metavar="Y,X",
                   help="query pixel for the attention figure (repeatable; default: 4 points "
                        "at the quarter positions)")
    p.add_argument("--sample-index", type=int, default=0,
                   help="which grid column's z the attention figure uses (default 0)")
    p.add_argument("--class-id", type=int, help="class of the attention sample (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ sources (default: "
                   "$MLFLOW_TRACKING_URI, else ./mlruns sqlite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pipelines.model_io import ModelSourceError, load_generator_any, resolve_device
    from sagan.checkpoint import CheckpointError
    from sagan.config import ConfigError
    from sagan.truncation import check_truncation
    from sagan.visualize import (
        GRID_META_KEY,
        VisualizationError,
        attention_figure,
        quarter_points,
        sample_grid,
        save_png,
    )

    known: tuple[type[BaseException], ...] = (ConfigError, ModelSourceError, CheckpointError,
                                              VisualizationError, OSError)
    steps = tqdm(total=3 if args.attention_out else 2, desc="sample", unit="step",
                 disable=args.no_progress)
    try:
        from pipelines.tracking import TrackingError

        known = (*known, TrackingError)
        classes = None
        if args.classes:
            try:
                classes = [int(c) for c in args.classes.split(",") if c.strip()]
            except ValueError:
                raise ConfigError(f"--classes '{args.classes}': expected a comma list of class "
                                  "ids, e.g. 0,3,7") from None
        try:
            check_truncation(args.truncation, "--truncation")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        device = resolve_device(args.device)
        steps.set_postfix_str("loading model")
        G = load_generator_any(args.model, device, tracking_uri=args.tracking_uri).generator
        steps.update()
        steps.set_postfix_str("sample grid")
        grid = sample_grid(G, n_per_class=args.n_per_class, n=args.n, seed=args.seed,
                           device=device, class_ids=classes, truncation=args.truncation)
        save_png(grid, args.out)
        steps.update()
        attn_path = None
        if args.attention_out:
            steps.set_postfix_str("attention maps")
            size = int(json.loads(grid.info[GRID_META_KEY])["image_size"])
            queries = args.query or quarter_points(size)
            fig = attention_figure(G, queries, seed=args.seed, sample_index=args.sample_index,
                                   device=device, class_id=args.class_id)
            save_png(fig, args.attention_out)
            attn_path = args.attention_out
            steps.update()
    except known as exc:
        steps.close()
        print(f"sample.py: error: {exc}", file=sys.stderr)
        return 2
    steps.close()
    print(f"wrote {args.out}")
    if attn_path:
        print(f"wrote {attn_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
