"""Where artifacts live and what keys them.

    <artifacts>/<dataset>/<teacher>-<thash>/                 teacher.pt, metrics.csv, config.yaml, done
    <artifacts>/<dataset>/<teacher>-<thash>/profile-<phash>/ activations.h5, quality.csv, quality.png,
                                                             selection.yaml, features.h5, done
    <artifacts>/<dataset>/<teacher>__<student>/<method>-<rhash>/seed<k>/
                                                             config.yaml, metrics.csv, student.pt, done

Each hash covers exactly the resolved settings that change the artifact (not the device, the
progress bar or the data root), so two runs that differ in anything but the seed never share a
directory, and a rerun with the same settings finds its finished work.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common.config import Config, TrainConfig, short_hash
from common.data import Data

# Settings that never change what a run produces.
_RUNTIME_ONLY = ("progress", "device", "eval_batch_size", "teacher_source", "seed")


def _train_key(train: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(train).items() if k not in _RUNTIME_ONLY}


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


def profile_key(cfg: Config) -> dict[str, Any]:
    p = dataclasses.asdict(cfg.profile)
    return {k: v for k, v in p.items() if k not in ("batch_size", "device", "progress")}


def profile_dir(cfg: Config, data: Data) -> Path:
    return teacher_dir(cfg, data) / f"profile-{short_hash(profile_key(cfg))}"


def run_key(cfg: Config, data: Data, method: dict[str, Any], uses_teacher: bool) -> dict[str, Any]:
    """Everything that changes a distillation run except its seed."""
    key: dict[str, Any] = {
        "dataset": dataset_key(cfg, data),
        "student": dataclasses.asdict(cfg.student),
        "method": method,
        "train": _train_key(cfg.train),
    }
    if uses_teacher:
        key["teacher"] = teacher_id(cfg, data)
        key["profile"] = profile_key(cfg)
    return key


def pair_dir(cfg: Config) -> Path:
    return Path(cfg.artifacts) / cfg.dataset.name / f"{cfg.teacher.name}__{cfg.student.name}"


def run_dir(cfg: Config, data: Data, method: dict[str, Any], uses_teacher: bool, seed: int) -> Path:
    name = f"{method['name']}-{short_hash(run_key(cfg, data, method, uses_teacher))}"
    return pair_dir(cfg) / name / f"seed{seed}"
