"""Reference values of every metric on known image sets, at the evaluation's sample count.

    python -m bench.eval_values                  # 1,000 vs 1,000, standard Inception weights
    python -m bench.eval_values --n 200 --out /tmp/values.json

What a score means depends on the sample count (FID is biased upward at small N; precision and
recall of two real sets fall below 1 when the k-NN balls are few), so docs/EVALUATION.md quotes
these numbers for the 1,000 vs 1,000 the quickstart evaluates with: Fashion-MNIST test vs train
(the floor a perfect generator reaches), the train images blurred, one train image repeated (a
collapsed generator) and uniform noise, each against the test images.
"""

from __future__ import annotations

import argparse
import time

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import RESULTS, environment, write_json

import torch

import sagan.eval as E
from tests.fixtures.inception import blur, fashion_images
# isort: on

METRICS = ["fid", "kid", "prc", "dc"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FID/KID/precision/recall/density/coverage of "
                                "Fashion-MNIST sets against its test images (standard weights).")
    p.add_argument("--n", type=int, default=1000, help="images per set (default 1000)")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch (default 50)")
    p.add_argument("--out", default=str(RESULTS / "eval_values.json"), help="JSON output")
    args = p.parse_args(argv)
    if args.n < 10:
        p.error("--n: must be >= 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = E.resolve_inception_weights(None, download=False)
    fe = E.feature_extractor(weights)
    t0 = time.perf_counter()
    train = fashion_images("train", args.n, seed=1)
    images = {"test": fashion_images("test", args.n, seed=0), "train (real)": train,
              "blurred": blur(train),
              "noise": torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0))}
    feats = {k: E.featurize(v, fe, args.batch_size, progress=True, desc=k)
             for k, v in images.items()}
    feats["collapsed"] = {k: f[:1].repeat(args.n, 1) for k, f in feats["train (real)"].items()}
    seconds = time.perf_counter() - t0
    rows = {name: E.scores(f, feats["test"], METRICS) for name, f in feats.items()
            if name != "test"}
    print(f"{'set vs test':<14}" + "".join(f"{k:>11}" for k in E.score_keys(METRICS)))
    for name, row in rows.items():
        print(f"{name:<14}" + "".join(f"{row[k]:>11.4g}" for k in E.score_keys(METRICS)))
    path = write_json(args.out, {"n": args.n, "rows": rows, "featurise_seconds": seconds,
                                 "protocol": E.evaluation_protocol(METRICS, weights, None, 32,
                                                                   args.n),
                                 "environment": environment(torch.device("cpu"))})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
