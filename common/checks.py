"""Checks of the whole resolved config, run by every stage before any teacher is built or any
file is written, so that a bad input costs seconds and leaves the artifacts tree as it was.

    data = load_data_checked(cfg)    # stage 1 and 2: everything below, then the data, then what needs it

Each check lives where its subject does; this module only runs them in order, cheap first:
`common.config.validate_config` (ranges), `common.artifacts.layout.check_writable` (the artifacts
path), the model, dataset and method names (`common.profile.teacher.check_names`, the registries), the
devices, `common.data.registry.load_data` (data errors), then the layer counts of an untrained teacher
and student, `common.profile.runner.validate`, the training and analysis subsets, and whether a teacher
checkpoint is fine-tuned or used as it is (`common.models.as_is.teacher_as_is`). Stage 2's layer
pairing is checked by `common.distill.check_layer_lists`, before the profile is read or built.
"""
from __future__ import annotations

from pathlib import Path

from common.artifacts import layout as artifacts
from common.profile import runner as profile
from common.train import tracking
from common.config import Config, validate_config
from common.data.registry import DATASETS, Data, load_data
from common.errors import ConfigError
from common.layers.tables import layer_infos_for
from common.profile.stats import q_subsets
from common.models.as_is import teacher_as_is
from common.profile.teacher import build_teacher, check_names
from common.runtime import resolve_device


def load_data_checked(cfg: Config, data: Data | None = None, needs_teacher: bool = True) -> Data:
    """Check everything, loading the data (unless given) in between; returns the data.
    `needs_teacher` False (a stage-2 method that never reads the teacher: ce) leaves out the
    profile's and the teacher checkpoint's checks, settings that run never uses."""
    check_config(cfg)
    data = data if data is not None else load_data(cfg.dataset)
    check_with_data(cfg, data, needs_teacher)
    return data


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


def check_with_data(cfg: Config, data: Data, needs_teacher: bool = True) -> None:
    """What needs the data: both models build for its image size and channels, the profile
    settings fit the teacher's layer count, the subsets fit the classes (the last two, and the
    teacher checkpoint, only where a teacher is used: `needs_teacher`)."""
    n_teacher = len(layer_infos_for(cfg.teacher, data))  # an untrained copy: cheap, and model errors show here
    layer_infos_for(cfg.student, data)
    data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
    if not needs_teacher:
        return
    profile.validate(cfg, n_teacher)
    data.training_subset(cfg.teacher_train.train_subset, cfg.dataset.split_seed)
    per_class_a = cfg.profile.subset_size // data.num_classes
    if per_class_a < 2:
        # METHOD 6.4's intra-class statistics compare two samples of a class; with one, the
        # minimum intra-class similarity is the sample against itself (1) and S is meaningless.
        raise ConfigError(
            f"profile.subset_size={cfg.profile.subset_size} gives {per_class_a} image(s) per class to subset A for "
            f"{data.num_classes} classes; set profile.subset_size >= {2 * data.num_classes} (two per class)"
        )
    q_subsets(cfg, data)
    if cfg.teacher.pretrained is not None:
        # Fine-tune or use as it is (teacher.finetune): decided now, so teacher.finetune=false
        # with a checkpoint of other classes stops here. The teacher directory's key follows it.
        teacher_as_is(cfg, data)
        if not (artifacts.teacher_dir(cfg, data) / artifacts.DONE).exists():
            # Reads the whole checkpoint now, not after the teacher directory exists; a finished
            # teacher (trained or used as it is) no longer needs it.
            build_teacher(cfg, data, pretrained=True)
