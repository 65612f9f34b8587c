"""Checks of the whole resolved config, run by every stage before any teacher is built or any
file is written, so that a bad input costs seconds and leaves the artifacts tree as it was.

    data = load_data_checked(cfg)    # stage 1 and 2: everything below, then the data, then what needs it

Each check lives where its subject does; this module only runs them in order, cheap first:
`common.config.validate_config` (ranges), `common.artifacts.layout.check_writable` (the artifacts
path), the model, dataset and method names (`common.profile.teacher.check_names`, the registries), the
devices; then, where the dataset's registry entry knows its shape (`shape_before_data`), the layer
counts of an untrained teacher and student, `common.profile.runner.validate` and stage 2's layer
pairing (`common.distill.check_layer_lists`), so that they do not wait for the data; then
`common.data.registry.load_data` (data errors), the same layer checks on the data, the training
subsets against the classes and a batch, the analysis subsets, and whether a teacher checkpoint is
fine-tuned or used as it is (`common.models.as_is.teacher_as_is`). Settings a run never reads
are left out: a method without a teacher (ce) skips the teacher's, one that takes no layers from
the profile (`MethodSpec.reads_profile`: kd, dkd, the baselines' layers) the profile's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.artifacts import layout as artifacts
from common.profile import runner as profile
from common.train import tracking
from common.config import Config, TrainConfig, validate_config
from common.data.registry import DATASETS, Data, load_data
from common.errors import ConfigError
from common.layers.tables import DataShape, layer_infos_for
from common.profile.stats import q_subsets
from common.models.as_is import teacher_as_is
from common.profile.teacher import build_teacher, check_names
from common.runtime import resolve_device


def load_data_checked(
    cfg: Config, data: Data | None = None, needs_teacher: bool = True, reads_profile: bool = True,
    before_data: Callable[[DataShape], object] | None = None,
) -> Data:
    """Check everything, loading the data (unless given) in between; returns the data.
    `needs_teacher` False (a stage-2 method that never reads the teacher: ce) leaves out the
    teacher's checks; `reads_profile` False (a method that takes no layers from the profile: kd,
    dkd, fitnet's baseline layers) leaves out the profile's: settings that run never uses.

    What needs only the dataset's shape (the layer counts: profile.k, layer lists, also
    `before_data`'s) is checked before the data is read when the dataset's registry entry knows
    its shape, so such an error does not wait for ImageNet's file listing or a dataset's decoding.
    """
    check_config(cfg)
    shape = shape_before_data(cfg) if data is None else data
    if shape is not None:
        _check_layers(cfg, shape, reads_profile)
        if before_data is not None:
            before_data(shape)
    data = data if data is not None else load_data(cfg.dataset)
    check_with_data(cfg, data, needs_teacher, reads_profile)
    return data


@dataclass(frozen=True)
class KnownShape:
    """A dataset's shape known before its files are read (a `layer_infos_for` DataShape)."""

    num_classes: int
    in_channels: int
    image_size: int


def shape_before_data(cfg: Config) -> KnownShape | None:
    """The dataset's shape from its registry entry and dataset.image_size, or None when only its
    files tell (an image_folder). The class count of a dataset that discovers it (imagenet) is a
    stand-in: it changes the classifier's shape, never the layer count, the only use here."""
    spec = DATASETS.get(cfg.dataset.name)
    size = cfg.dataset.image_size or spec.native_size
    if spec.in_channels is None or size is None:
        return None
    return KnownShape(spec.num_classes or 2, spec.in_channels, size)


def _check_layers(cfg: Config, shape: DataShape, reads_profile: bool) -> None:
    """Both models build for the shape (model errors show here); the profile's layer settings fit
    the teacher's layer count (`reads_profile`)."""
    n_teacher = len(layer_infos_for(cfg.teacher, shape))  # an untrained copy: cheap
    layer_infos_for(cfg.student, shape)
    if reads_profile:
        profile.validate(cfg, n_teacher)


def check_config(cfg: Config) -> None:
    """What needs no data: ranges (again, for configs built or changed in code), the artifacts
    path, names, checkpoint files, devices and trackers."""
    validate_config(cfg)
    artifacts.check_writable(cfg.artifacts)
    check_names(cfg)
    DATASETS.get(cfg.dataset.name)
    if cfg.student.pretrained is not None:
        # Students train from scratch (METHOD 5); a set value would be ignored without a word.
        raise ConfigError(f"student.pretrained={cfg.student.pretrained} is not used: students train from scratch; remove it")
    if cfg.teacher.pretrained is not None and not Path(cfg.teacher.pretrained).expanduser().is_file():
        raise ConfigError(
            f"teacher.pretrained file {cfg.teacher.pretrained} not found; give a local checkpoint file (a torchvision "
            f"ImageNet state dict, a published CIFAR zoo {{\"model\": state_dict}} file, a tv:/timm: state dict), or null"
        )
    for device in dict.fromkeys((cfg.teacher_train.device, cfg.train.device, cfg.profile.device)):
        resolve_device(device)
    for tracker in dict.fromkeys((cfg.teacher_train.tracker, cfg.train.tracker)):
        tracking.check(tracker)


def check_with_data(cfg: Config, data: Data, needs_teacher: bool = True, reads_profile: bool = True) -> None:
    """What needs the data: both models build for its image size and channels, the training
    subsets fit the classes and a batch, the profile settings fit the teacher's layer count and
    the classes (only where the profile is read: `reads_profile`), the teacher checkpoint (only
    where a teacher is used: `needs_teacher`)."""
    _check_layers(cfg, data, reads_profile)
    _check_batch(data, cfg.train, "train", cfg.dataset.split_seed)
    if not needs_teacher:
        return
    data.training_subset(cfg.teacher_train.train_subset, cfg.dataset.split_seed, "teacher_train.train_subset")
    if reads_profile:
        _check_profile(cfg, data)
    # Fine-tune or use as it is (teacher.finetune): decided now, so teacher.finetune=false with a
    # checkpoint of other classes stops here. The teacher directory's key follows it.
    if cfg.teacher.pretrained is None or not teacher_as_is(cfg, data):  # a teacher that trains
        _check_batch(data, cfg.teacher_train, "teacher_train", cfg.dataset.split_seed)
    if cfg.teacher.pretrained is not None and not (artifacts.teacher_dir(cfg, data) / artifacts.DONE).exists():
        # Reads the whole checkpoint now, not after the teacher directory exists; a finished
        # teacher (trained or used as it is) no longer needs it.
        build_teacher(cfg, data, pretrained=True)


def _check_profile(cfg: Config, data: Data) -> None:
    """Stage 1's subsets against the classes and the analysis pool (k and the layers:
    `_check_layers`)."""
    per_class_a = cfg.profile.subset_size // data.num_classes
    if per_class_a < 2:
        # METHOD 6.4's intra-class statistics compare two samples of a class; with one, the
        # minimum intra-class similarity is the sample against itself (1) and S is meaningless.
        raise ConfigError(
            f"profile.subset_size={cfg.profile.subset_size} gives {per_class_a} image(s) per class to subset A for "
            f"{data.num_classes} classes; set profile.subset_size >= {2 * data.num_classes} (two per class)"
        )
    q_subsets(cfg, data)


def _check_batch(data: Data, train: TrainConfig, section: str, split_seed: int) -> None:
    """The training subset fits the classes and holds at least one batch: checked here, not at
    the first epoch, which for a student comes after the teacher's whole training."""
    rows = data.training_subset(train.train_subset, split_seed, f"{section}.train_subset")
    if len(rows) < train.batch_size:
        raise ConfigError(
            f"{len(rows)} training images are fewer than one batch of {train.batch_size}; lower {section}.batch_size or raise {section}.train_subset"
        )
