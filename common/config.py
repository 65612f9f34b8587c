"""Configuration: dataclasses for every section, YAML loading, `a.b=value` overrides, validation.

A config file is a short diff from the defaults below; unknown keys are errors (with a
suggestion), so a typo never silently falls back to a default. The resolved config of every
run is written next to its artifacts. The `method:` section is derived from MethodSpec
(common/method_spec.py), the one declaration of a method's hyperparameters.

One module, although some 450 lines: a new config key is a field and its range check,
both beside the loader that applies them; split, adding one key would touch three files.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from common.errors import ConfigError
from common.method_spec import MethodSpec, override_fields


@dataclass
class DatasetConfig:
    """Which dataset and how it is split. Images are held in RAM as uint8 (METHOD 2.1), or, for
    datasets larger than RAM (imagenet, a large image_folder), streamed from their files
    (common/data/stream.py)."""

    name: str = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location (see common/data/registry.py)
    download: bool = False  # torchvision download, for users with network (cifar10/100)
    image_size: int | None = None  # resize to this size; None keeps the native size
    val_size: int = 0  # images held out of the training split (class-balanced) for validation
    split_seed: int = 0  # seeds the validation split and the training subset
    # auto | true | false: decode images from their files per batch instead of holding them in
    # RAM. imagenet always streams; image_folder streams (auto) when its decoded images would
    # exceed common.data.registry.STREAM_ABOVE_BYTES; the other datasets never do.
    stream: Union[bool, str] = "auto"
    resize: int | None = None  # streamed: eval resize of the shorter side before the centre crop; None: image_size / 0.875
    workers: int | None = None  # streamed: decode workers (DataLoader processes, threads elsewhere); None: cores, at most 8
    bad_images: str = "error"  # streamed: error | skip (an undecodable file is replaced by the next of its class, and counted)
    mean_std: str = "auto"  # auto | dataset | imagenet: normalisation; auto = dataset statistics in RAM, ImageNet's when streamed


@dataclass
class ModelConfig:
    name: str = "resnet34"
    width: float = 1.0  # channel / hidden-dim multiplier, for small versions on a CPU
    pretrained: str | None = None  # local checkpoint: torchvision ImageNet state dict (METHOD 3), published CIFAR zoo file, tv:/timm: state dict


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a model, optionally a checkpoint (`pretrained`), and whether it is trained.

    A section of its own because `finetune` means nothing for a student (students train from
    scratch, METHOD 5), so `student.finetune` is an unknown key rather than a silent no-op.
    """

    # auto: a checkpoint whose classifier has the dataset's classes is used as it is (evaluated,
    # profiled, distilled from: a published teacher, as the CRD / DKD tables use them); any other
    # checkpoint (an ImageNet one on CIFAR) is fine-tuned for teacher_train.epochs. true: always
    # trained; false: used as it is, an error when the classes differ or no checkpoint is given.
    # Decided in common.models.as_is.teacher_as_is.
    finetune: Union[bool, str] = "auto"


@dataclass
class TrainConfig:
    """One training run: AdamW + OneCycle stepped per batch (METHOD 5, 8.7, section 0 item 6),
    or the reference's "+240E" SGD + MultiStep recipe (METHOD 8.7, 9; configs/*_240e.yaml)."""

    epochs: int = 50
    batch_size: int = 128  # the global batch: under torchrun each rank takes batch_size / ranks
    lr: float | None = None  # peak LR; None: the model's reference value for the method (8.7)
    weight_decay: float = 0.01
    optimizer: str = "adamw"  # adamw | sgd (momentum below, Nesterov off, as the reference)
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # onecycle (stepped per batch) | multistep (x gamma after each milestone epoch)
    pct_start: float = 0.3  # onecycle only
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # multistep only: epochs after which the LR drops
    gamma: float = 0.1  # multistep only
    backbone_lr_mult: float = 0.01  # pretrained models only: backbone group LR factor (METHOD 5)
    train_subset: int | None = None  # class-balanced subset of the training images (seeded)
    augment: bool = False  # per-sample random crop (pad 4) + horizontal flip
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast, used only on CUDA
    channels_last: bool = True  # NHWC weights and activations (CNNs; cuDNN and oneDNN convolutions skip a layout change)
    teacher_source: str = "auto"  # auto | cache | live; auto = cache unless augment is on
    # auto | resident | prefetch: the training images and the cached teacher features (their rows
    # of the run's layers) on the device once, or gathered on the host by a thread and copied ahead
    # of the step (common/train/inputs.py). auto: each resident when it fits half the free device
    # memory, one budget for both, the images counted first; always resident on the CPU, where
    # that is the RAM copy (or the cache file, read as before). Never changes a number.
    input_path: str = "auto"
    # auto | true | false: torch.compile of the training step (common/train/compiled.py; CUDA
    # graphs on CUDA). auto is off everywhere: on the CPU it did not pay, and no GPU has measured
    # it yet. Never part of the run key, like the device.
    compile: Union[bool, str] = "auto"
    progress: bool = True
    # seconds between progress lines when stderr is not a terminal (a cluster log: the bar is off
    # there); 0: none. Runtime only (common/runtime.py: IntervalLine)
    log_interval_s: float = 60.0
    tracker: str = "tensorboard"  # tensorboard (event files in the run's tb/) | wandb | trackio | none


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
    memory_budget_mb: int = 1536  # features, Grams and float64 working copies S/I/E/Q may hold at once (RAM, or GPU memory on a GPU), beside one teacher batch
    keep_activations: bool = False  # also write subset A's features of every layer (activations.h5)
    cache_dtype: str = "float16"  # dtype of the feature cache (float16 | float32)
    # method.student_layers=Q profiles seed 0's `ce` run (common/profile/student.py); when that run
    # is not finished: true trains it first, false stops with an error before anything trains
    train_student_ce: bool = True
    device: str = "auto"
    progress: bool = True
    log_interval_s: float = 60.0  # seconds between stage 1's progress lines (S/I/E/Q, the cache) when stderr is not a terminal; 0: none


def _override_type(spec_type: Any) -> Any:
    """The config type of a MethodSpec field: optional (None keeps the preset's value), with a
    list where the spec holds a tuple, since YAML and the command line give lists."""
    options = typing.get_args(spec_type) if typing.get_origin(spec_type) in (Union, types.UnionType) else (spec_type,)
    as_config = tuple(list[typing.get_args(o)[0]] if typing.get_origin(o) is tuple else o for o in options)
    return Union[(*as_config, None)]


# Derived from MethodSpec's fields rather than declared here, so that a new method hyperparameter
# is one field in common/method_spec.py, not that field plus a mirrored one here.
_METHOD_CONFIG_DOC = """A distillation method: a registered preset (common/methods) plus optional overrides.

    One field per MethodSpec field (common/method_spec.py documents each) except those a preset
    fixes (PRESET_ONLY); fields left at None take the preset's value.
    """
_SPEC_TYPES = typing.get_type_hints(MethodSpec)
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig",
    [("name", str, field(default="ours"))]
    + [(f.name, _override_type(_SPEC_TYPES[f.name]), field(default=None)) for f in override_fields()],
    namespace={"__doc__": _METHOD_CONFIG_DOC, "__module__": __name__},  # pickles as common.config.MethodConfig
)


# The method's layer lists are checked where their words and the layer counts are known:
# common.methods.base.validate_spec refuses an empty method.teacher_layers / student_layers for a
# method with a feature loss ("use the profile's selection" is the word `selected`, not []; for a
# method without one, [] is its preset's value and means nothing to distil), and
# common.distill.check_layer_lists a layer named twice. Their order is kept on purpose: one2one
# pairs the i-th teacher layer with the i-th student layer, so a descending list is the
# reversed map (the study's reversed_q arm), not a slip.


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="resnet34"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet9"))
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.01))
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    artifacts: str = "artifacts"
    # Several teachers (common/profile/multi.py): names, or mappings of the `teacher` section's keys
    # (name, width, pretrained, finetune); a name takes the `teacher` section's other values. [] or
    # one entry: the one `teacher`, exactly as without this key. teacher_rule picks their layers:
    # pooled (top-k over all teachers' layers) | per_teacher (top k/m of each of the m teachers).
    teachers: list[Any] = field(default_factory=list)
    teacher_rule: str = "pooled"


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent notation without a dot (1e-3, 1e6, 5E-4) as a float.

    YAML 1.1, which PyYAML follows, types `1e-3` as a string, so `train.lr=1e-3` was refused as
    "the wrong type"; people write learning rates this way, in files and on the command line.
    """


_Loader.add_implicit_resolver(  # copies SafeLoader's table first, so yaml.safe_load is unchanged
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text like yaml.safe_load, plus exponent floats without a dot (see _Loader)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file, e.g. configs/default.yaml")
        try:
            loaded = load_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(exc)}); fix the syntax there") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read ({type(exc).__name__}); pass a readable YAML text file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        apply_override(data, item)
    cfg = from_dict(Config, data)
    validate_config(cfg)
    return cfg


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'<problem> at line L, column C' of a YAML error, on one line."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML ("5" -> 5, "[1,2]" -> list)."""
    if "=" not in item:
        # `--seeds 0 1 2` gives --seeds "0" and leaves "1", "2" here
        seeds = '; several seeds go in one quoted argument: --seeds "0 1 2"' if item.strip().lstrip("-").isdigit() else ""
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5{seeds}")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else None
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
        raise ConfigError(f"config key '{where}' has value {value!r} of the wrong type; give {_type_name(tp)}")
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
        example = '; e.g. --seeds "0 1 2", --seeds 0,1,2 or seeds=[0,1,2]' if where == "seeds" else f", e.g. {where}=[0,1,2]"
        raise ConfigError(f"config key '{where}' must be a list of integers, got {value!r}{example}") from None


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null (empty)"}


def _type_name(tp: Any) -> str:
    """How a person would name a value of type `tp` ("a number or null (empty)")."""
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of integers" if typing.get_args(tp) == (int,) else "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


# ----------------------------------------------------------------------------- validation

CACHE_DTYPES = ("float16", "float32")
TEACHER_SOURCES = ("auto", "cache", "live")
STREAM_MODES = ("auto", True, False)
BAD_IMAGES = ("error", "skip")  # common.data.stream.BAD_IMAGES
MEAN_STD = ("auto", "dataset", "imagenet")
INPUT_PATHS = ("auto", "resident", "prefetch")  # common.train.inputs.MODES
# The layer-ranking criteria of METHOD 6.5 (profile.criterion, the layer words of a method), one
# home for torch-free readers too (stage 3, the study).
CRITERIA = ("Q", "S", "I", "E", "sqrtIE")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "multistep")
TEACHER_RULES = ("pooled", "per_teacher")  # how several teachers' layers are selected (common/profile/multi.py)


def validate_config(cfg: Config) -> None:
    """Range checks of every section, whichever stage reads it, so that a bad value stops the
    run before any teacher is trained or any file is written (types were checked on loading).

    Checks that need a model or the data (layer counts, subset sizes, names) run in
    common.checks; this function needs nothing but the config.
    """
    _check_dataset(cfg.dataset)
    for where, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        _check_model(where, model)
    _check_finetune(cfg.teacher)
    for where, train in (("teacher_train", cfg.teacher_train), ("train", cfg.train)):
        _check_train(where, train)
    _check_profile(cfg.profile)
    _require(cfg.teacher_rule in TEACHER_RULES, f"teacher_rule is '{cfg.teacher_rule}'; choose one of {', '.join(TEACHER_RULES)}")
    # seeds: one student run per entry. Empty would train nothing after building the teacher; a
    # repeat would name the same run directory twice (and count it twice in a mean). Order is
    # free: runs are independent and reports sort by seed.
    _require(len(cfg.seeds) > 0, "seeds is empty; give at least one integer seed, e.g. seeds=[0] or --seeds 0")
    repeated = sorted({s for s in cfg.seeds if cfg.seeds.count(s) > 1})
    _require(not repeated, f"seeds {cfg.seeds} lists seed {repeated[0] if repeated else ''} twice; list each seed once")
    for seed in cfg.seeds:
        _require(0 <= seed <= SEED_MAX, f"seeds {cfg.seeds} lists seed {seed}; give integers between 0 and {SEED_MAX}, e.g. seeds=[0,1,2]")
    _require(cfg.artifacts.strip() != "", "artifacts is empty; give the directory artifacts go to, e.g. artifacts=artifacts")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(where: str, value: int | None, hint: str = "", optional: bool = False) -> None:
    """`where` must be an integer >= 1 (or None when `optional`)."""
    if value is None and optional:
        return
    empty = " or leave it empty" if optional else ""
    _require(value is not None and value >= 1, f"{where}={value} is not allowed; set it to an integer >= 1{empty}{hint}")


def _finite(where: str, value: float, low: float, *, strict: bool, high: float | None = None, hint: str = "") -> None:
    """`where` must be a finite number above `low` (or at least `low` unless `strict`), below `high` if given."""
    ok = math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" if high is None else f"between {low:g} and {high:g} (exclusive)"
        raise ConfigError(f"{where}={value} is not allowed; set it to a number {bound}{hint}")


# Seeds of every key stay in 0..2**32 - 1: there each generator sees a distinct seed. NumPy's
# legacy seed takes 32 bits (runtime.seed_everything passes seed % 2**32, so 2**32 would replay
# seed 0's NumPy stream), torch takes a 64-bit one (-1 is 2**64 - 1 there), and the training loop
# seeds its batch order with seed * 1_000_003 + epoch, which overflows torch's range for seeds
# above ~1.8e13, after the teacher has been trained. A negative seed is also what other tools
# write for "random", which this tool would take as a fixed seed without a word.
SEED_MAX = 2**32 - 1


def _seed(where: str, value: int) -> None:
    _require(0 <= value <= SEED_MAX, f"{where}={value} is not allowed; set it to an integer between 0 and {SEED_MAX}, e.g. 0")


def _check_dataset(d: DatasetConfig) -> None:
    _require(d.name.strip() != "", "dataset.name is empty; give a dataset, e.g. dataset.name=fashion_mnist")
    _require(d.root is None or d.root.strip() != "", "dataset.root is an empty string; give the dataset's directory or leave it unset for the default")
    _positive_int("dataset.image_size", d.image_size, " (pixels; empty keeps the native size)", optional=True)
    _require(d.val_size >= 0, f"dataset.val_size={d.val_size} is not allowed; set it to 0 (no validation split) or a number of images")
    _seed("dataset.split_seed", d.split_seed)
    _require(d.stream in STREAM_MODES, f"dataset.stream is {d.stream!r}; use auto, true or false")
    _positive_int("dataset.resize", d.resize, " (pixels of the shorter side before the centre crop; empty: image_size / 0.875)", optional=True)
    _positive_int("dataset.workers", d.workers, " (decode workers; empty: the cores, at most 8)", optional=True)
    _require(d.bad_images in BAD_IMAGES, f"dataset.bad_images is '{d.bad_images}'; use error (stop, naming the file) or skip (replace and count)")
    _require(d.mean_std in MEAN_STD, f"dataset.mean_std is '{d.mean_std}'; use one of {', '.join(MEAN_STD)}")


def _check_model(where: str, m: ModelConfig) -> None:
    _require(m.name.strip() != "", f"{where}.name is empty; give a model, e.g. {where}.name=resnet9")
    _finite(f"{where}.width", m.width, 0.0, strict=True, hint=" (1.0 is the published width, 0.25 a quarter)")
    _require(m.pretrained is None or m.pretrained.strip() != "", f"{where}.pretrained is an empty string; give a checkpoint file or null")


def _check_finetune(t: ModelConfig) -> None:
    # getattr: a plain ModelConfig in the teacher's place (a student spec put there in code) has
    # no setting, which is "auto".
    finetune = getattr(t, "finetune", "auto")
    _require(
        isinstance(finetune, bool) or finetune == "auto",
        f"teacher.finetune={finetune!r} is not allowed; use auto (use a checkpoint of the dataset's classes as it is, "
        f"fine-tune any other), true (always train) or false (never train)",
    )
    _require(
        not (finetune is False and t.pretrained is None),
        "teacher.finetune=false uses a checkpoint as it is, but teacher.pretrained is not set; give the checkpoint "
        "with teacher.pretrained=PATH, or set teacher.finetune=auto to train the teacher from scratch",
    )


def _check_train(where: str, t: TrainConfig) -> None:
    _positive_int(f"{where}.epochs", t.epochs)
    _positive_int(f"{where}.batch_size", t.batch_size)
    _positive_int(f"{where}.eval_batch_size", t.eval_batch_size)
    _finite(f"{where}.log_interval_s", t.log_interval_s, 0, strict=False, hint=" (seconds; 0: no progress lines)")
    if t.lr is not None:
        _finite(f"{where}.lr", t.lr, 0.0, strict=True, hint=", e.g. 0.01, or leave it empty for the model's reference LR")
    _finite(f"{where}.weight_decay", t.weight_decay, 0.0, strict=False)
    _finite(f"{where}.pct_start", t.pct_start, 0.0, strict=True, high=1.0, hint=", e.g. 0.3 (the share of steps that warm up)")
    _require(t.optimizer in OPTIMIZERS, f"{where}.optimizer is '{t.optimizer}'; use one of {', '.join(OPTIMIZERS)}")
    _require(t.schedule in SCHEDULES, f"{where}.schedule is '{t.schedule}'; use one of {', '.join(SCHEDULES)}")
    _finite(f"{where}.momentum", t.momentum, 0.0, strict=False, high=1.0, hint=", e.g. 0.9")
    # gamma multiplies the LR at each milestone: above 1 the "drop" raises it (10 for 0.1 is the
    # likely slip); 1 keeps it constant, which is allowed.
    _require(
        math.isfinite(t.gamma) and 0 < t.gamma <= 1,
        f"{where}.gamma={t.gamma} is not allowed; set it to a number > 0 and <= 1, e.g. 0.1 (the LR factor at each milestone)",
    )
    # milestones: each epoch after which the LR drops, so they must be increasing (a repeat would
    # apply gamma twice at once, MultiStepLR's counting; an unsorted list reads as a typo) and
    # >= 1. Checked under onecycle too, where they are unused, so a bad list is not carried into a
    # later multistep run. Empty is refused only under multistep: a multistep schedule without a
    # milestone is a constant LR nobody asks for by that name. Milestones at or past the last
    # epoch are allowed: a shortened run of the 240-epoch recipe (train.epochs=5 on a *_240e
    # config, as a quick try) keeps its schedule and has not reached a drop yet.
    _require(
        all(m >= 1 for m in t.milestones) and t.milestones == sorted(set(t.milestones)),
        f"{where}.milestones={t.milestones} is not allowed; give increasing epochs >= 1, each listed once, e.g. [150,180,210]",
    )
    _require(
        not (t.schedule == "multistep" and not t.milestones),
        f"{where}.milestones=[] with {where}.schedule=multistep never drops the LR; give the epochs after which it drops, e.g. [150,180,210]",
    )
    _finite(f"{where}.backbone_lr_mult", t.backbone_lr_mult, 0.0, strict=False)
    _positive_int(f"{where}.train_subset", t.train_subset, " (a number of training images)", optional=True)
    _seed(f"{where}.seed", t.seed)
    _require(t.device.strip() != "", f"{where}.device is empty; use auto, cpu, cuda or cuda:N")
    _require(t.teacher_source in TEACHER_SOURCES, f"{where}.teacher_source is '{t.teacher_source}'; use one of {', '.join(TEACHER_SOURCES)}")
    _require(t.input_path in INPUT_PATHS, f"{where}.input_path is '{t.input_path}'; use one of {', '.join(INPUT_PATHS)}")
    _require(
        isinstance(t.compile, bool) or t.compile == "auto",
        f"{where}.compile={t.compile!r} is not allowed; use auto (off until a GPU measures that it pays), true (torch.compile the step) or false",
    )
    _require(
        not (t.augment and t.teacher_source == "cache"),
        f"{where}.augment=true needs the live teacher (cached features would be stale); set {where}.teacher_source=live or auto",
    )


def _check_profile(p: ProfileConfig) -> None:
    _positive_int("profile.k", p.k, " (the number of teacher layers to select)")
    _finite("profile.log_interval_s", p.log_interval_s, 0, strict=False, hint=" (seconds; 0: no progress lines)")
    # profile.layers: None means "the top-k by profile.criterion". An empty list would do the same
    # while hashing to a profile directory of its own, and most likely stands for a list the
    # user meant to fill in, so it is refused. Order is free (the selection is stored sorted);
    # a layer named twice, also as i and i - n, is refused by common.profile.runner.validate, which
    # knows the teacher's layer count.
    _require(
        p.layers is None or len(p.layers) > 0,
        "profile.layers=[] is not allowed; list teacher layers, e.g. profile.layers=[3,7,11], or leave it unset (null) to take the top profile.k by profile.criterion",
    )
    _positive_int("profile.pool_size", p.pool_size, " (images; empty uses the whole training split)", optional=True)
    _positive_int("profile.subset_size", p.subset_size)
    # Subset B's class spectra need two samples of a class (one centred sample has none, so I = 0
    # and Q = S for every layer, silently). Subset A's per-class minimum is checked with the data
    # (common.checks), where the class count is known.
    _require(
        p.per_class_cap >= 2,
        f"profile.per_class_cap={p.per_class_cap} is not allowed; set it to an integer >= 2 (subset B's images per class, default 500)",
    )
    _seed("profile.seed", p.seed)
    _positive_int("profile.batch_size", p.batch_size)
    _positive_int("profile.memory_budget_mb", p.memory_budget_mb, " (MiB that S/I/E/Q may hold, default 1536)")
    _require(p.cache_dtype in CACHE_DTYPES, f"profile.cache_dtype is '{p.cache_dtype}'; use float16 or float32")
    _require(p.device.strip() != "", "profile.device is empty; use auto, cpu, cuda or cuda:N")


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


def short_hash(obj: Any, n: int = 8) -> str:
    """Stable short hash of a JSON-able object (dataclasses are converted first)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]
