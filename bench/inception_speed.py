"""Inception pool3 featurisation on CPU: the current path against faster runtimes, same images.

    python -m bench.inception_speed                     # 100 Fashion-MNIST images, 2 reps
    python -m bench.inception_speed --n 200 --reps 3 --out /tmp/inception.json

Every evaluation spends most of its time here (~0.1-0.2 s per image per core), so a faster
network is the cheapest way to a 1,000-image evaluation under a minute. Cases, all fp32, all
on the same uint8 images, timed interleaved in one process (bench/timing.py):

- `eager_channels_last`: what `sagan.eval.featurize` runs today: the baseline, ratio 1.0;
- `eager_contiguous`: the same network in the default memory format;
- `compile`: `torch.compile` of the channels-last network (compile time not counted);
- `onnxruntime`: the network after the resize exported to ONNX, ONNX Runtime's CPU provider;
- `openvino`: what evaluation runs on CPU with `eval.runtime: auto` (the quickstart's setting;
  sagan/eval/openvino_pool3.py): the network converted from torch to OpenVINO, precision hint
  forced to f32 (OpenVINO picks bf16 by itself on CPUs that have it, not the same measurement).

The resize to 299 px and the (x - 128) / 128 scaling stay in torch for the exported cases
(torch-fidelity's TF1-compatible bilinear resize, cheap next to the network). Each case's
features are compared with the baseline's: relative L2 error over all features, and the FID
of the case's features against a second image set minus the baseline's FID. A case may be
adopted only with error <= 1e-4 and |dFID| <= 0.1 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

# isort: off
# bench.timing first: it sets the OpenMP environment before torch loads
from bench.timing import RESULTS, environment, interleave, paired_ratio, write_json

import torch

import sagan.eval as E
from sagan.eval.openvino_pool3 import Trunk, preprocess
from sagan.eval.weights import POOL_LAYER
from tests.fixtures.inception import fashion_images
# isort: on

CASES = ("eager_channels_last", "eager_contiguous", "compile", "onnxruntime", "openvino")
MAX_REL_ERROR = 1e-4
MAX_FID_DELTA = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Inception pool3 featurisation speed on CPU: the "
                                "current eager channels-last path vs contiguous, torch.compile, "
                                "ONNX Runtime and OpenVINO (fp32), same images, one run.")
    p.add_argument("--n", type=int, default=100, help="images (default 100)")
    p.add_argument("--batch-size", type=int, default=50, help="batch (default 50)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per case (default 2)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma list out of {','.join(CASES)} (the baseline always runs)")
    p.add_argument("--out", default=str(RESULTS / "inception_speed.json"), help="JSON output")
    args = p.parse_args(argv)
    bad = [c for c in args.cases.split(",") if c not in CASES]
    if bad:
        p.error(f"--cases: unknown {bad}; choose from {','.join(CASES)}")
    if args.n < 2 or args.batch_size < 1 or args.reps < 1:
        p.error("--n must be >= 2, --batch-size and --reps >= 1")
    return args


def _batched(fn, images: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([fn(images[i:i + bs]) for i in range(0, len(images), bs)])


def build_cases(weights: Path, names: list[str], tmp: Path, bs: int) -> dict:
    """name -> callable(uint8 batch) -> pool3 features (float32, CPU)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    base = E.feature_extractor(weights)  # channels_last, as evaluation runs it
    plain = FeatureExtractorInceptionV3(E.weights.FEATURE_EXTRACTOR, [POOL_LAYER],
                                        feature_extractor_weights_path=str(weights)).eval()
    cases = {"eager_channels_last": lambda x: E.featurize(x, base, bs)[POOL_LAYER]}
    threads = torch.get_num_threads()
    if "eager_contiguous" in names:
        cases["eager_contiguous"] = lambda x: _batched(
            lambda b: plain(b)[0], x, bs)
    if "compile" in names:
        compiled = torch.compile(base)
        cases["compile"] = lambda x: _batched(
            lambda b: compiled(b.contiguous(memory_format=torch.channels_last))[0], x, bs)
    if "onnxruntime" in names or "openvino" in names:
        onnx_path = tmp / "inception_pool3.onnx"
        trunk = Trunk(plain).eval()
        torch.onnx.export(trunk, (torch.zeros(2, 3, 299, 299),), str(onnx_path),
                          input_names=["x"], output_names=["pool3"], opset_version=17,
                          dynamic_axes={"x": {0: "n"}, "pool3": {0: "n"}}, dynamo=False)
    if "onnxruntime" in names:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        cases["onnxruntime"] = lambda x: _batched(
            lambda b: torch.from_numpy(sess.run(None, {"x": preprocess(b).numpy()})[0]), x, bs)
    if "openvino" in names:  # what evaluation runs with eval.runtime=auto / openvino
        ov_fe = E.feature_extractor(weights, runtime="openvino", cache_dir=tmp)
        cases["openvino"] = lambda x: E.featurize(x, ov_fe, bs)[POOL_LAYER]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(["eager_channels_last", *args.cases.split(",")]))
    weights = E.resolve_inception_weights(None, download=False)
    images = fashion_images("test", args.n, seed=0)
    other = fashion_images("train", args.n, seed=1)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        t0 = time.perf_counter()
        cases = build_cases(weights, names, Path(tmp), args.batch_size)
        for fn in cases.values():  # warm up (compile, ORT/OV graph optimisation) on one batch
            fn(images[:args.batch_size])
        setup_s = time.perf_counter() - t0
        features = {name: fn(images) for name, fn in cases.items()}  # for the match check
        ref = features["eager_channels_last"]
        other_f = {POOL_LAYER: cases["eager_channels_last"](other)}
        samples = interleave({name: functools.partial(fn, images) for name, fn in cases.items()},
                             args.reps, torch.device("cpu"), warmup=0)
    base_fid = E.scores({POOL_LAYER: ref}, other_f, ["fid"])["fid"]
    base_wall = samples["eager_channels_last"].wall
    rows = {}
    for name in cases:
        err = float((features[name] - ref).norm() / ref.norm())
        fid = E.scores({POOL_LAYER: features[name]}, other_f, ["fid"])["fid"]
        s = samples[name].summary()
        rows[name] = {**s, "img_per_s": args.n / s["wall_median_s"],
                      "speedup_vs_baseline": paired_ratio(base_wall, samples[name].wall),
                      "rel_error": err, "fid": fid, "fid_delta": fid - base_fid,
                      "matches": err <= MAX_REL_ERROR and abs(fid - base_fid) <= MAX_FID_DELTA}
    print(f"{args.n} images, batch {args.batch_size}, {args.reps} reps, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'case':<22}{'img/s':>8}{'ratio':>8}{'rel err':>10}{'dFID':>9}  matches")
    for name, r in rows.items():
        print(f"{name:<22}{r['img_per_s']:>8.2f}{r['speedup_vs_baseline']:>8.2f}"
              f"{r['rel_error']:>10.1e}{r['fid_delta']:>9.4f}  {r['matches']}")
    path = write_json(args.out, {"n": args.n, "batch_size": args.batch_size, "reps": args.reps,
                                 "baseline": "eager_channels_last", "setup_s": setup_s,
                                 "baseline_fid": base_fid, "rows": rows,
                                 "environment": environment(torch.device("cpu"))})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
