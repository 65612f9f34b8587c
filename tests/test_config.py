"""Config loading: defaults, YAML diffs, overrides, strict validation."""
from pathlib import Path

import pytest

from common.config import Config, load_config, short_hash
from common.errors import ConfigError


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg.train.epochs == 50 and cfg.train.batch_size == 128 and cfg.train.pct_start == 0.3
    assert cfg.train.weight_decay == 0.01 and cfg.profile.k == 4 and cfg.profile.criterion == "Q"
    assert cfg.dataset.name == "fashion_mnist"


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nteacher:\n  width: 0.5\n")
    cfg = load_config(path, ["train.epochs=3", "seeds=0 1 2", "method.teacher_layers=[3,4]"])
    assert cfg.train.epochs == 3
    assert cfg.teacher.width == 0.5 and cfg.teacher.name == "resnet34"  # partial section keeps defaults
    assert cfg.seeds == [0, 1, 2]
    assert cfg.method.teacher_layers == [3, 4]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epoch=5", ["train.epoch", "did you mean 'train.epochs'"]),
        ("train.epochs=abc", ["train.epochs", "integer"]),
        ("nosection=1", ["nosection"]),
        ("train.augment=maybe", ["train.augment", "true or false"]),
        ("train.epochs", ["section.key=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_or_bad_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_load():
    for path in sorted(Path("configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_hash_changes_with_settings_only():
    a, b = load_config(None, ["train.epochs=3"]), load_config(None, ["train.epochs=3"])
    assert short_hash(a) == short_hash(b)
    assert short_hash(a) != short_hash(load_config(None, ["train.epochs=4"]))
