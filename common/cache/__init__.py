"""The teacher-feature cache that stage 1 writes and stage 2 reads.

    reader          the HDF5/RAM cache format and its row lookup for training batches
    write           writing the cache: a background writer thread, checksums, atomic replacement

`common.cache` keeps the import path of the former module common/cache.py: its public names
are those of `common.cache.reader`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.cache.reader import (  # noqa: F401
        FORMAT_VERSION,
        CHECKSUM,
        VERIFY_BLOCK_BYTES,
        POSITIONS,
        DEFAULT_REBUILD_HINT,
        SLICE_FILL,
        layer_name,
        FeatureCache,
        storage_order,
        epoch_batches,
    )

__all__ = [
    "FORMAT_VERSION",
    "CHECKSUM",
    "VERIFY_BLOCK_BYTES",
    "POSITIONS",
    "DEFAULT_REBUILD_HINT",
    "SLICE_FILL",
    "layer_name",
    "FeatureCache",
    "storage_order",
    "epoch_batches",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.cache.reader"), name)
    raise AttributeError(f"module 'common.cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
