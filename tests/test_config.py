"""Config loading: defaults, YAML diffs, overrides, strict validation."""
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1e6", 1e6), ("5E-4", 5e-4), ("1.5e-2", 0.015), ("+2e1", 20.0), ("0.01", 0.01), ("3", 3.0)])
def test_exponent_numbers_are_floats_in_overrides(text, value):
    """YAML 1.1 reads 1e-3 as a string; people write learning rates that way."""
    assert load_config(None, [f"train.lr={text}"]).train.lr == value


def test_exponent_numbers_in_overrides_and_files(tmp_path: Path):
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    assert load_config(None, ["teacher_train.lr=1e6"]).teacher_train.lr == 1e6
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\nteacher_train:\n  lr: 1e6\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.teacher_train.lr) == (1e-3, 5e-4, 1e6)
    assert load_config(path, ["train.lr=2e-2"]).train.lr == 2e-2
    with pytest.raises(ConfigError, match="train.epochs.*integer"):  # an int key still refuses non-integers
        load_config(None, ["train.epochs=1e3"])
    assert yaml.safe_load("1e-3") == "1e-3"  # the global safe loader is left as it was


def test_flags_and_overrides_mix_in_any_order():
    from common import cli

    args = cli.parser("test").parse_intermixed_args(["train.epochs=2", "--quiet", "train.lr=0.1", "--teacher", "resnet18", "profile.k=3"])
    cfg = cli.build_config(args, {})
    assert (cfg.train.epochs, cfg.train.lr, cfg.profile.k, cfg.teacher.name) == (2, 0.1, 3, "resnet18")
    assert cfg.train.progress is False and cfg.profile.progress is False


def test_flag_values_are_strings():
    """A flag's value is taken as written, even when it would read as YAML."""
    from common import cli

    args = cli.parser("test").parse_intermixed_args(["--data-root", "yes", "--artifacts", "1e3"])
    cfg = cli.build_config(args, {})
    assert (cfg.dataset.root, cfg.artifacts) == ("yes", "1e3")


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epochs=0", ["train.epochs=0", ">= 1"]),
        ("teacher_train.epochs=-1", ["teacher_train.epochs=-1"]),
        ("train.batch_size=0", ["train.batch_size=0"]),
        ("train.eval_batch_size=0", ["train.eval_batch_size"]),
        ("train.lr=0", ["train.lr=0", "> 0"]),
        ("train.lr=.inf", ["train.lr=inf"]),
        ("train.weight_decay=-1e-4", ["train.weight_decay"]),
        ("train.pct_start=0", ["train.pct_start", "between 0 and 1"]),
        ("train.pct_start=1", ["train.pct_start"]),
        ("train.backbone_lr_mult=-1", ["backbone_lr_mult"]),
        ("train.train_subset=0", ["train.train_subset=0"]),
        ("train.teacher_source=disk", ["teacher_source", "auto, cache, live"]),
        ("teacher.width=-0.5", ["teacher.width"]),
        ("dataset.val_size=-1", ["dataset.val_size"]),
        ("dataset.image_size=0", ["dataset.image_size=0"]),
        ("dataset.root=''", ["dataset.root"]),
        ("profile.k=0", ["profile.k=0"]),
        ("profile.pool_size=0", ["profile.pool_size"]),
        ("profile.subset_size=0", ["profile.subset_size"]),
        ("profile.per_class_cap=0", ["profile.per_class_cap"]),
        ("profile.memory_budget_mb=0", ["profile.memory_budget_mb"]),
        ("profile.cache_dtype=bf16", ["profile.cache_dtype"]),
        ("seeds=[]", ["seeds is empty"]),
        ("seeds=[1,1]", ["seed 1 twice"]),
        ("seeds=[0,-1]", ["seeds [0, -1] lists seed -1", "between 0 and 4294967295"]),
        ("seeds=[4294967296]", ["seed 4294967296"]),
        ("train.seed=-1", ["train.seed=-1"]),
        ("teacher_train.seed=4294967296", ["teacher_train.seed=4294967296"]),
        ("profile.seed=-1", ["profile.seed=-1"]),
        ("dataset.split_seed=-1", ["dataset.split_seed=-1"]),
        ("profile.layers=[]", ["profile.layers=[]", "leave it unset (null)"]),
        ("profile.per_class_cap=1", ["profile.per_class_cap=1", ">= 2"]),
        ("train.milestones=[180,150]", ["train.milestones=[180, 150]", "increasing"]),
        ("train.milestones=[150,150]", ["train.milestones=[150, 150]", "once"]),
        ("train.milestones=[0,150]", ["train.milestones=[0, 150]", ">= 1"]),
        ("train.gamma=10", ["train.gamma=10.0", "<= 1"]),
        ("train.gamma=0", ["train.gamma=0.0", "> 0"]),
        ("train.gamma=.nan", ["train.gamma=nan"]),
        ("train.momentum=1", ["train.momentum=1.0"]),
        ("train.momentum=-0.1", ["train.momentum=-0.1"]),
        ("train.lr=.nan", ["train.lr=nan"]),
        ("train.weight_decay=.inf", ["train.weight_decay=inf"]),
        ("teacher.width=.nan", ["teacher.width=nan"]),
        ("artifacts=''", ["artifacts is empty"]),
    ],
)
def test_out_of_range_values_are_refused_on_loading(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)
    assert ";" in str(err.value)  # what is wrong; how to fix it


def test_empty_milestones_are_refused_only_where_they_are_used():
    """Under onecycle the milestones are unused, so [] is harmless; under multistep it would
    never drop the LR."""
    assert load_config(None, ["train.milestones=[]"]).train.milestones == []
    with pytest.raises(ConfigError, match=r"train\.milestones=\[\] with train\.schedule=multistep"):
        load_config(None, ["train.schedule=multistep", "train.milestones=[]"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["profile.layers=[11,3,7]"],  # order is free: the selection is stored sorted
        ["profile.layers=[-1]"],  # negative counts from the end (METHOD 4.1 rule 6)
        ["train.schedule=multistep", "train.epochs=5"],  # milestones past the last epoch: a shortened 240-epoch recipe
        ["train.gamma=1"],  # a constant LR through the milestones
        ["seeds=[2,0,1]", "train.seed=4294967295", "profile.seed=0", "dataset.split_seed=4294967295"],
        ["profile.per_class_cap=2"],
    ],
)
def test_edge_values_that_stay_allowed(overrides):
    load_config(None, overrides)


def test_optional_values_may_stay_empty():
    cfg = load_config(None, ["train.lr=null", "train.train_subset=null", "profile.pool_size=", "dataset.image_size=null"])
    assert cfg.train.lr is None and cfg.train.train_subset is None and cfg.profile.pool_size is None
