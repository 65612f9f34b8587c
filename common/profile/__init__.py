"""Stage 1: train or load the teacher, extract its features, score every layer, select the top-k.

    runner          the stage-1 pipeline (`run`), the one entry point stage1_profile_teacher.py calls
    teacher         building, training and loading the teacher (lock, config.yaml, failed/done markers)
    stats           the per-layer S/I/E/Q table of a teacher
    manifest        the manifest: the selected layers that stage 2 reads
    features        the feature cache of a teacher for stage 2
    student         the CE student's own S/I/E/Q and top-k by Q (method.student_layers=Q), by stats' code

`common.profile` keeps the import path of the former module common/profile.py: its public names
are those of `common.profile.runner`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.profile.runner import (  # noqa: F401
        Profile,
        validate,
        run,
        manifest_for,
    )

__all__ = [
    "Profile",
    "validate",
    "run",
    "manifest_for",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.profile.runner"), name)
    raise AttributeError(f"module 'common.profile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
