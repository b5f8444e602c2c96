"""Config loading, dotted overrides and validation: every invalid value names its field."""

from pathlib import Path

import pytest
import yaml

from sagan.config import ConfigError, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", [p for p in PRESETS
                                    if not p.name.startswith(("sweep", "results"))],
                         ids=lambda p: p.name)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.model.image_size in (32, 64, 128)


def test_paper_128_preset_matches_paper():
    cfg = load_config(ROOT / "configs" / "sagan128.yaml")
    t, m = cfg.train, cfg.model
    assert (t.batch_size, m.g_ch, m.d_ch, t.lr_g, t.lr_d, t.steps) == (256, 64, 64, 1e-4, 4e-4,
                                                                       1_000_000)
    assert m.g_attention == [64] and m.d_attention == [64]
    assert (t.beta1, t.beta2, t.loss, t.ndis) == (0.0, 0.999, "hinge", 1)
    assert m.image_size == 128 and m.num_classes == 1000


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr_d=2e-4", "model.g_attention=[16, 32]",
                             "model.num_classes=0", "data.endpoint_url=http://127.0.0.1:9"])
    assert cfg.train.lr_d == pytest.approx(2e-4)
    assert cfg.model.g_attention == [16, 32]
    assert cfg.model.num_classes == 0
    assert cfg.data.endpoint_url == "http://127.0.0.1:9"
    flat = flatten(cfg)
    assert flat["train.lr_d"] == pytest.approx(2e-4) and flat["model.g_attention"] == [16, 32]


@pytest.mark.parametrize("overrides, field", [
    (["train.lrr=1"], "train.lrr"),
    (["bogus.x=1"], "bogus"),
    (["train.lr_d=-1e-4"], "train.lr_d"),
    (["train.lr_g=0"], "train.lr_g"),
    (["model.g_attention=[128]"], "model.g_attention"),
    (["model.d_attention=[32]"], "model.d_attention"),  # D at 32 px has no 32x32 feature map
    (["model.image_size=48"], "model.image_size"),
    (["train.steps=abc"], "train.steps"),
    (["model.g_attention=16"], "model.g_attention"),
    (["train.loss=wgan"], "train.loss"),
    (["eval.metrics=[fid, lpips]"], "eval.metrics[1]"),
])
def test_invalid_values_name_their_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert f"'{field}'" in msg
    assert "\n" not in msg


def test_batch_must_split_over_workers():
    """The workers are the runner's (pipelines/config.py): its loader checks the pair."""
    from pipelines.config import load_run_config

    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["train.batch_size=30", "train.workers=4"])
    msg = str(info.value)
    assert "'train.batch_size'" in msg
    assert "\n" not in msg


def test_runner_sections_and_moved_fields():
    """The library skips the runner's sections (cluster, tracking) and reads the fields that
    moved out of `train` (train.workers, ...) at their new place; the runner's loader validates
    them, under either name."""
    from pipelines.config import load_run_config

    cfg = load_config("configs/quickstart.yaml", ["train.workers=3", "cluster.bogus=1",
                                                  "tracking.experiment=[1]"])
    assert not hasattr(cfg, "cluster") and cfg.train.steps == yaml.safe_load(
        Path("configs/quickstart.yaml").read_text())["train"]["steps"]
    run = load_run_config("configs/quickstart.yaml", ["train.workers=1",
                                                      "train.storage_path=s3://b/r"])
    assert (run.cluster.workers, run.cluster.storage_path, run.cluster.run_name) == \
        (1, "s3://b/r", "quickstart")
    with pytest.raises(ConfigError, match="'cluster.workers': must be >= 1"):
        load_run_config(None, ["train.workers=0"])
    with pytest.raises(ConfigError, match="unknown key 'cluster.bogus'"):
        load_run_config(None, ["cluster.bogus=1"])
    assert "cluster.workers" in flatten(run) and "train.workers" not in flatten(run)


def test_attention_validated_against_image_size():
    load_config(None, ["model.image_size=128", "model.g_attention=[64, 128]",
                       "model.d_attention=[64]"])
    with pytest.raises(ConfigError, match="allowed: \\[8, 16, 32\\]"):
        load_config(None, ["model.image_size=32", "model.g_attention=[64]"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="'model'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr_d"])
