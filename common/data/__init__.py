"""Datasets: the registry of names, splits and subsets, and the on-disk formats they are read from.

    registry        DATASETS, load_data, balanced subsets, validation split, augmentation, fingerprints
    formats         readers for Fashion-MNIST IDX, CIFAR pickles, Tiny ImageNet and image folders
    stream          datasets larger than RAM: the file index, FileImages, ImageNet's transforms

`common.data` keeps the import path of the former module common/data.py: its public names
are those of `common.data.registry`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.data.registry import (  # noqa: F401
        STD_EPS,
        PAD,
        Data,
        DatasetSpec,
        DATASETS,
        load_data,
        channel_stats,
        class_counts,
        balanced_subset,
        validation_split,
        augment_batch,
        fingerprint,
    )

__all__ = [
    "STD_EPS",
    "PAD",
    "Data",
    "DatasetSpec",
    "DATASETS",
    "load_data",
    "channel_stats",
    "class_counts",
    "balanced_subset",
    "validation_split",
    "augment_batch",
    "fingerprint",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.data.registry"), name)
    raise AttributeError(f"module 'common.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
