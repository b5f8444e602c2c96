"""DiffAugment: each policy does what the paper's code does, is differentiable, and draws from
the generator it is given (reproducible per seed, different per rank)."""

import pytest
import torch

from sagan.diffaugment import color, cutout, diff_augment, translation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_translation_shifts_whole_images_with_zero_fill() -> None:
    x = torch.arange(1, 1 + 2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    out = translation(x, generator=_gen(0))
    for i in range(2):
        # find the shift: every non-zero output pixel equals the input pixel shifted by it
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.equal(out[i, 0], _shift(x[i, 0], dy, dx))]
        assert len(shifts) == 1, i


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_cutout_zeroes_one_square_of_half_the_size_clipped_at_the_border() -> None:
    x = torch.ones(64, 3, 16, 16)
    out = cutout(x, generator=_gen(1))
    zeroed = out[:, 0] == 0
    assert torch.equal(zeroed, (out == 0).all(dim=1))  # same mask on every channel
    for m in zeroed:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 8
        assert int(m.sum()) == len(rows) * len(cols)  # a (clipped) rectangle
        assert len(rows) == 8 or rows[0] == 0 or rows[-1] == 15  # only the border clips it
    assert (zeroed.flatten(1).sum(1) == 64).float().mean() > 0.2  # many squares are whole


def test_color_is_per_image_affine_in_brightness_and_contrast() -> None:
    x = torch.rand(8, 1, 8, 8, generator=_gen(2)) * 2 - 1
    out = color(x, generator=_gen(3))
    for i in range(8):  # grey images: out = a * x + b per image
        a, b = torch.linalg.lstsq(torch.stack([x[i].flatten(), torch.ones(64)], 1),
                                  out[i].flatten()[:, None]).solution.flatten()
        assert torch.allclose(a * x[i] + b, out[i], atol=1e-5)
        assert 0.0 <= float(a) <= 1.5 + 1e-6


@pytest.mark.parametrize("policy", [["color"], ["translation"], ["cutout"],
                                    ["color", "translation", "cutout"]])
def test_differentiable_reproducible_and_per_generator(policy: list[str]) -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, policy, _gen(7))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(out, diff_augment(x, policy, _gen(7)))  # same seed, same draw
    assert not torch.equal(out, diff_augment(x, policy, _gen(8)))  # other rank, other draw
    assert diff_augment(x, [], _gen(7)) is x


def test_trainer_augments_what_d_sees_in_both_steps_from_its_noise_stream() -> None:
    """train.diffaugment: the D step scores augmented real and fake images and the G step an
    augmented fake, drawn from the trainer's per-rank noise generator (so runs are repeatable)."""
    from sagan.config import Config
    from sagan.training import GANTrainer

    def trainer(policy: list[str]) -> GANTrainer:
        cfg = Config()
        cfg.model.g_ch = cfg.model.d_ch = 8
        cfg.model.channels = 1
        cfg.train.diffaugment = policy
        cfg.validate()
        return GANTrainer(cfg)

    real, y = torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8) % 10
    plain, aug, aug2 = trainer([]), trainer(["translation", "cutout"]), trainer(
        ["translation", "cutout"])
    seen: list[torch.Tensor] = []
    aug.D_raw.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    d_plain, d_aug, d_aug2 = plain.d_step(real, y), aug.d_step(real, y), aug2.d_step(real, y)
    # the same real batch, but D saw it shifted / cut out: some pixels are exactly zero
    assert not torch.equal(seen[0][:8], real)
    assert (seen[0][:8] == 0).float().mean() > 0.2 > (real == 0).float().mean()
    assert d_aug["loss_d"] != d_plain["loss_d"]
    assert d_aug["loss_d"] == d_aug2["loss_d"]  # same seed, same draws
    aug.g_step(8)
    assert (seen[-1] == 0).float().mean() > 0.2  # the G step's fakes are augmented too
