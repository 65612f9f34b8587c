"""Stage 1's selection for torchdistill: the selected teacher layers, and the student layers they
are paired with, as torchdistill `forward_hook` entries (module paths), so a torchdistill user
distils the layers Q chose without this project's training loop.

    <profile dir>/torchdistill_<student>.yaml      teacher: {forward_hook: {input: [], output: [paths]}}
                                                    student: {forward_hook: {input: [], output: [paths]}}

A generalized layer's feature is its boundary module's output (`common.layers.hooks.capture`), so
a forward hook on the same module path captures the same tensor (tests/test_forward_hooks.py
checks it with torchdistill's own ForwardHookManager on tv:resnet18).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.artifacts.layout import dir_name
from common.config import Config
from common.data.registry import Data
from common.files import atomic_write_text
from common.layers.tables import layer_infos_for
from common.models import MODELS


def hook_file(pdir: Path, student: str) -> Path:
    return Path(pdir) / f"torchdistill_{dir_name(student)}.yaml"


def forward_hook_entry(paths: list[str]) -> dict[str, Any]:
    """torchdistill's `forward_hook` setting of one model: the outputs of these module paths."""
    return {"forward_hook": {"input": [], "output": list(paths)}}


def write_forward_hooks(cfg: Config, data: Data, pdir: Path, selected: list[int], how: str) -> Path:
    """torchdistill_<student>.yaml: the teacher's selected layers and, where their numbers match,
    the student layers `ours` pairs them with one-to-one (the student's baseline list)."""
    teacher = layer_infos_for(cfg.teacher, data)
    student_layers = list(MODELS.get(cfg.student.name).baseline_layers)
    body: dict[str, Any] = {"teacher": forward_hook_entry([teacher[i].path for i in selected])}
    note = f"# The student's baseline layers {student_layers} do not pair one-to-one with {len(selected)} teacher layers: no student entry.\n"
    if len(student_layers) == len(selected):
        student = layer_infos_for(cfg.student, data)
        body["student"] = forward_hook_entry([student[i].path for i in student_layers])
        note = ""
    body["generalized_layers"] = {"teacher": list(selected), **({"student": student_layers} if "student" in body else {})}
    header = (
        f"# torchdistill forward hooks for {cfg.teacher.name} -> {cfg.student.name} on {cfg.dataset.name}: the teacher layers\n"
        f"# stage 1 selected ({how}) and the student layers paired with them in order. Put `teacher` and `student`\n"
        f"# under `train:` (or a stage of `stages:`) of a torchdistill config; `generalized_layers` is for reference.\n"
    )
    path = hook_file(pdir, cfg.student.name)
    atomic_write_text(path, header + note + yaml.safe_dump(body, sort_keys=False))
    return path
