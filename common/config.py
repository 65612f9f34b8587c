"""Configuration: dataclasses for every section, YAML loading, `a.b=value` overrides, validation.

A config file is a short diff from the defaults below; unknown keys are errors (with a
suggestion), so a typo never silently falls back to a default. The resolved config of every
run is written next to its artifacts.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from common.errors import ConfigError

LayerSpec = Union[str, list[int], None]  # a word ("selected", "baseline", a criterion) | explicit indices


@dataclass
class DatasetConfig:
    """Which dataset and how it is split. Images are held in RAM as uint8 (METHOD 2.1)."""

    name: str = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location (see common/data.py)
    download: bool = False  # torchvision download, for users with network (cifar10/100)
    image_size: int | None = None  # resize to this size; None keeps the native size
    val_size: int = 0  # images held out of the training split (class-balanced) for validation
    split_seed: int = 0  # seeds the validation split and the training subset


@dataclass
class ModelConfig:
    name: str = "resnet34"
    width: float = 1.0  # channel / hidden-dim multiplier, for small versions on a CPU
    pretrained: str | None = None  # local torchvision ImageNet state-dict file (METHOD 3)


@dataclass
class TrainConfig:
    """One training run: AdamW + OneCycle stepped per batch (METHOD 5, 8.7, section 0 item 6)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float | None = None  # peak LR; None: the model's reference value for the method (8.7)
    weight_decay: float = 0.01
    pct_start: float = 0.3
    backbone_lr_mult: float = 0.01  # pretrained models only: backbone group LR factor (METHOD 5)
    train_subset: int | None = None  # class-balanced subset of the training images (seeded)
    augment: bool = False  # per-sample random crop (pad 4) + horizontal flip
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast, used only on CUDA
    teacher_source: str = "auto"  # auto | cache | live; auto = cache unless augment is on
    progress: bool = True


@dataclass
class ProfileConfig:
    """Stage 1: knowledge-quality profile of the teacher (METHOD 6, section 0 items 2-4)."""

    k: int = 4
    criterion: str = "Q"  # Q | S | I | E | sqrtIE
    layers: list[int] | None = None  # explicit teacher layers instead of top-k
    pool_size: int | None = None  # images the Q subsets are drawn from; None: the whole training split
    subset_size: int = 5000  # subset A: floor(subset_size / C) per class
    per_class_cap: int = 500  # subset B: min(cap, floor(n_pool / C)) per class
    seed: int = 0
    batch_size: int = 256
    memory_budget_mb: int = 2048  # features + Grams S/I/E/Q may hold at once (RAM, or GPU memory on a GPU)
    keep_activations: bool = False  # also write subset A's features of every layer (activations.h5)
    cache_dtype: str = "float16"  # dtype of the feature cache (float16 | float32)
    device: str = "auto"
    progress: bool = True


@dataclass
class MethodConfig:
    """A distillation method: a registered preset (common/methods) plus optional overrides.

    Fields left at None take the preset's value.
    """

    name: str = "ours"
    ce_weight: float | None = None
    kd_weight: float | None = None
    kd_temperature: float | None = None
    kd_standardize: bool | None = None
    feature_weight: float | None = None
    teacher_layers: LayerSpec = None  # "selected" | "baseline" | Q | S | I | E | sqrtIE (top-k by it) | [indices]
    student_layers: LayerSpec = None  # "baseline" | [indices]
    mapping: str | None = None  # one2one | full
    projector: str | None = None  # conv1x1 | three_layer | none
    detach_head: bool | None = None


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet34"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet9"))
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01))
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    artifacts: str = "artifacts"


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file, e.g. configs/default.yaml")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        apply_override(data, item)
    return from_dict(Config, data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML ("5" -> 5, "[1,2]" -> list)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or 'top'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{_join(where, close[0])}'?)" if close else ""
            raise ConfigError(f"unknown config key '{_join(where, key)}'{hint}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], _join(where, name))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        default = _default_section(where)
        merged = dataclasses.asdict(default) if default is not None else {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{where}' must be a mapping, got {value!r}")
        merged.update(value)
        return from_dict(tp, merged, where)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{where}' has value {value!r} of the wrong type (expected {_type_name(tp)})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{where}' must be empty")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (int, str)) and not isinstance(value, bool) and item_tp is int:
            value = [value] if isinstance(value, int) else _int_list(value, where)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
    return value


def _int_list(value: str, where: str) -> list[int]:
    """Accept "0 1 2" / "0,1,2" (as make and shell loops pass them) for integer lists."""
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"config key '{where}' must be a list of integers, got {value!r}") from None


def _type_name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp)) or str(tp)


def _default_section(where: str) -> Any:
    """The default object of a (possibly nested) section, so partial sections keep defaults."""
    node: Any = Config()
    for part in where.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node if dataclasses.is_dataclass(node) else None


# ----------------------------------------------------------------------------- output


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False)


def short_hash(obj: Any, n: int = 8) -> str:
    """Stable short hash of a JSON-able object (dataclasses are converted first)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]
