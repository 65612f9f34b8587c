"""Where artifacts live and what keys them.

    <artifacts>/<dataset>/<teacher>-<thash>/                 teacher.pt, metrics.csv, config.yaml, done,
                                                             features-<dtype>.h5 (teacher outputs, rows on demand)
    <artifacts>/<dataset>/<teacher>-<thash>/quality-<qhash>/ layer_stats.csv (S/I/E/Q), [activations.h5]
    <artifacts>/<dataset>/<teacher>-<thash>/profile-<phash>/ profile.yaml (stage 1 -> stage 2), quality.csv,
                                                             quality.png, selection.yaml, done
    <artifacts>/<dataset>/<teacher>__<student>/<method>-<rhash>/seed<k>/
                                                             config.yaml, metrics.csv, student.pt, done

Each hash covers exactly the resolved settings that change the artifact (not the device, the
progress bar or the data root), so two runs that differ in anything but the seed never share a
directory, and a rerun with the same settings finds its finished work. Keys follow dependencies:
S/I/E/Q depend on the analysis pool and subsets only (qhash), the selection adds k, the
criterion and an explicit list (phash), and a run depends on the teacher layers it uses, not
on how they were chosen (rhash).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from common.config import Config, TrainConfig, short_hash
from common.data import Data
from common.errors import ConfigError

# Settings that never change what a run produces.
_RUNTIME_ONLY = ("progress", "device", "eval_batch_size", "teacher_source", "seed", "tracker")


# Settings read only by one optimizer or one schedule: left out of the key of the others.
_ONLY_FOR = {"momentum": ("optimizer", "sgd"), "pct_start": ("schedule", "onecycle"), "milestones": ("schedule", "multistep"), "gamma": ("schedule", "multistep")}
# Keys added after artifacts existed, left out at these values so finished runs keep their directory.
_ADDED_DEFAULTS = {"optimizer": "adamw", "schedule": "onecycle"}


def _train_key(train: TrainConfig) -> dict[str, Any]:
    key = {k: v for k, v in dataclasses.asdict(train).items() if k not in _RUNTIME_ONLY}
    for name, (switch, value) in _ONLY_FOR.items():
        if key[switch] != value:
            del key[name]
    for name, default in _ADDED_DEFAULTS.items():
        if key[name] == default:
            del key[name]
    return key


def dataset_key(cfg: Config, data: Data) -> dict[str, Any]:
    """The dataset by content (fingerprint: labels, pixels, preprocessing), not by path."""
    d = cfg.dataset
    return {"name": d.name, "fingerprint": data.fingerprint, "val_size": d.val_size, "split_seed": d.split_seed}


def teacher_key(cfg: Config, data: Data) -> dict[str, Any]:
    t = cfg.teacher
    pretrained = Path(t.pretrained).name if t.pretrained else None
    return {
        "dataset": dataset_key(cfg, data),
        "model": {"name": t.name, "width": t.width, "pretrained": pretrained},
        "train": {**_train_key(cfg.teacher_train), "seed": cfg.teacher_train.seed},
    }


def teacher_id(cfg: Config, data: Data) -> str:
    return f"{cfg.teacher.name}-{short_hash(teacher_key(cfg, data))}"


def teacher_dir(cfg: Config, data: Data) -> Path:
    return Path(cfg.artifacts) / cfg.dataset.name / teacher_id(cfg, data)


def quality_key(cfg: Config) -> dict[str, Any]:
    """What S/I/E/Q depend on besides the teacher: the analysis pool and the subsets (METHOD 6.1, 6.2)."""
    p = cfg.profile
    return {"pool_size": p.pool_size, "subset_size": p.subset_size, "per_class_cap": p.per_class_cap, "seed": p.seed}


def quality_dir(cfg: Config, data: Data) -> Path:
    return teacher_dir(cfg, data) / f"quality-{short_hash(quality_key(cfg))}"


def profile_key(cfg: Config) -> dict[str, Any]:
    """The selection: S/I/E/Q's key plus k, the criterion and an explicit list (METHOD 0.4)."""
    p = cfg.profile
    return {**quality_key(cfg), "k": p.k, "criterion": p.criterion, "layers": p.layers}


def profile_dir(cfg: Config, data: Data) -> Path:
    return teacher_dir(cfg, data) / f"profile-{short_hash(profile_key(cfg))}"


def run_key(cfg: Config, data: Data, method: dict[str, Any], teacher: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that changes a distillation run except its seed.

    teacher: None for a method without a teacher, else what the run takes from it (see
    `teacher_use`): the resolved layer indices, not the profile settings that chose them.
    """
    key: dict[str, Any] = {
        "dataset": dataset_key(cfg, data),
        "student": dataclasses.asdict(cfg.student),
        "method": method,
        "train": _train_key(cfg.train),
    }
    if teacher is not None:
        key["teacher"] = {"id": teacher_id(cfg, data), **teacher}
    return key


def teacher_use(teacher_layers: list[int], cache_dtype: str) -> dict[str, Any]:
    """What a run takes from its teacher: these layers' features (and the logits), read from a
    cache of this dtype (float16 rounding changes a run; a float32 cache equals the live teacher)."""
    return {"layers": list(teacher_layers), "cache_dtype": cache_dtype}


def pair_dir(cfg: Config) -> Path:
    return Path(cfg.artifacts) / cfg.dataset.name / f"{cfg.teacher.name}__{cfg.student.name}"


def run_dir(cfg: Config, data: Data, method: dict[str, Any], teacher: dict[str, Any] | None, seed: int) -> Path:
    name = f"{method['name']}-{short_hash(run_key(cfg, data, method, teacher))}"
    return pair_dir(cfg) / name / f"seed{seed}"


def check_writable(root: str | Path, what: str = "artifacts") -> None:
    """Refuse, before any work, a `root` that cannot hold artifacts: a file where the directory
    should be (or above it), or a directory this process cannot write to.

    Nothing is created: a missing `root` is judged by its nearest existing ancestor, so a failed
    check leaves no new directory. Writability is tried with a real (deleted) temporary file,
    since `os.access` says yes to root on a read-only bind or /proc.
    """
    path = Path(root).expanduser()
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:  # os.path: False, not an error, when unreadable
        existing = existing.parent
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{what} path {path} {where}; pass {what}=DIR with a directory (or a path where one can be created)")
    if not (os.access(existing, os.W_OK | os.X_OK) and _can_create_file(existing)):
        shown = f"{path} is" if existing == path else f"{path} cannot be created: {existing} is"
        raise ConfigError(f"{what} directory {shown} not writable; make it writable or pass {what}=DIR elsewhere")


def _can_create_file(directory: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True
