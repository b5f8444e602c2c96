"""Generator/Discriminator shapes at 32/64/128 px and attention placement."""

import pytest
import torch

from sagan.config import ModelConfig, load_config
from sagan.layers import SelfAttention
from sagan.models import Discriminator, Generator, attention_layers


@pytest.mark.parametrize("size, g_att, d_att", [
    (32, [16], [16]), (32, [], []), (64, [32], [32]), (64, [8, 32], [16]),
    (128, [64], [64]), (128, [], [8, 32]),
])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_shapes_and_placement(size, g_att, d_att, num_classes):
    cfg = load_config(None, [f"model.image_size={size}", f"model.g_attention={g_att}",
                             f"model.d_attention={d_att}", f"model.num_classes={num_classes}",
                             "model.g_ch=8", "model.d_ch=8", "model.channels=3"])
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    z, y = G.sample_inputs(2)
    assert (y is None) == (num_classes == 0)
    x, maps = G(z, y, return_attention=True)
    assert x.shape == (2, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    logits = D(x, y)
    assert logits.shape == (2,)
    # attention blocks: exactly the listed ones, each at the listed resolution
    g_blocks = [m for m in G.modules() if isinstance(m, SelfAttention)]
    d_blocks = [m for m in D.modules() if isinstance(m, SelfAttention)]
    assert len(g_blocks) == len(g_att) and len(d_blocks) == len(d_att)
    assert sorted(maps) == sorted(g_att)
    for r, m in maps.items():
        assert m.shape[2] == r * r  # one query per position of the r x r map
    assert sorted(attention_layers(G, D)) == sorted(
        [f"g_attn{r}" for r in g_att] + [f"d_attn{r}" for r in d_att])


def test_discriminator_attention_sees_the_listed_resolution():
    cfg = load_config(None, ["model.image_size=64", "model.d_attention=[16]", "model.g_ch=8",
                             "model.d_ch=8"])
    D = Discriminator(cfg.model)
    seen = []
    D.attention["16"].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    D(torch.randn(2, 3, 64, 64), torch.zeros(2, dtype=torch.long))
    assert seen == [(16, 16)]


def test_greyscale_and_label_checks():
    cfg = load_config(None, ["model.channels=1", "model.g_ch=8", "model.d_ch=8"])
    G, D = Generator(cfg.model), Discriminator(cfg.model)
    z, y = G.sample_inputs(2)
    assert G(z, y).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="y is required"):
        G(z)
    with pytest.raises(ValueError, match="y is required"):
        D(torch.zeros(2, 1, 32, 32))


def test_plain_cbn_is_the_official_per_class_table_without_sn():
    """model.cbn=plain: gamma from 1, beta from 0, plain embeddings (no SN parametrization)."""
    from torch.nn.utils import parametrize

    from sagan.layers import ConditionalBatchNorm2d

    plain = ConditionalBatchNorm2d(6, 4, form="plain")
    assert not parametrize.is_parametrized(plain.gain)
    assert torch.equal(plain.gain.weight, torch.ones(4, 6))
    assert torch.equal(plain.bias.weight, torch.zeros(4, 6))
    x, y = torch.randn(8, 6, 5, 5), torch.randint(0, 4, (8,))
    torch.testing.assert_close(plain(x, y), plain.bn(x))  # identity affine at init
    with torch.no_grad():
        plain.gain.weight[2] = 3.0
        plain.bias.weight[2] = -1.0
    out, h = plain(x, y), plain.bn(x)
    torch.testing.assert_close(out[y == 2], 3.0 * h[y == 2] - 1.0)
    torch.testing.assert_close(out[y != 2], h[y != 2])
    assert parametrize.is_parametrized(ConditionalBatchNorm2d(6, 4, form="sn").gain)


def test_width_multipliers_replace_the_table():
    cfg = ModelConfig(image_size=32, g_ch=8, d_ch=8, g_mults=[16, 8, 4, 2],
                      d_mults=[2, 4, 8, 16], cbn="plain", g_attention=[16], d_attention=[16])
    G, D = Generator(cfg), Discriminator(cfg)
    assert [b.conv2.out_channels for b in G.blocks] == [64, 32, 16]
    assert G.linear.out_features == 4 * 4 * 128
    assert [b.conv2.out_channels for b in D.blocks] == [16, 32, 64, 128]
    x = G(torch.randn(4, cfg.z_dim), torch.arange(4))
    assert x.shape == (4, 3, 32, 32)
    assert D(x, torch.arange(4)).shape == (4,)


@pytest.mark.parametrize("field,value,words", [
    ("g_mults", [16, 8, 4], "must list 4 positive multipliers"),
    ("d_mults", [2, 4, 0, 16], "must list 4 positive multipliers"),
    ("cbn", "spectral", "must be one of ['sn', 'plain']"),
])
def test_width_and_cbn_errors_name_the_field(field, value, words):
    from sagan.config import Config, ConfigError

    cfg = Config()
    setattr(cfg.model, field, value)
    with pytest.raises(ConfigError, match=f"model.{field}") as err:
        cfg.validate()
    assert words in str(err.value)
