"""The one training loop every method runs through, and what it needs.

    loop            fit/evaluate: epochs, checkpoints, resume, metrics, non-finite stops
    recipes         optimisers and LR schedules by name
    distributed     torchrun ranks, sharding, reductions
    tracking        TensorBoard/none experiment trackers
    teacher_source  teacher features per batch: live teacher or cache
    inputs          the training images and cached features on the device: resident, or prefetched by a thread
    streamed        a streamed dataset's batches, decoded by DataLoader workers

`common.train` keeps the import path of the former module common/train.py: its public names
are those of `common.train.loop`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.train.loop import (  # noqa: F401
        CHECKPOINT,
        METRICS,
        TeacherSource,
        Trainable,
        FitResult,
        evaluate,
        fit,
        finish,
    )

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "TeacherSource",
    "Trainable",
    "FitResult",
    "evaluate",
    "fit",
    "finish",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.train.loop"), name)
    raise AttributeError(f"module 'common.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
