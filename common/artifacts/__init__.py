"""Where every artifact lives and how finished runs are found again.

    layout          the artifacts tree: keys, hashes and directories of teachers, profiles and runs; the marker-file names
    discovery       reading the tree back: finished runs, teachers and profiles as tables (torch-free, for stage 3)

`common.artifacts` keeps the import path of the former module common/artifacts.py: its public names
are those of `common.artifacts.layout`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.artifacts.layout import (  # noqa: F401
        dataset_key,
        teacher_key,
        teacher_id,
        teacher_dir,
        dir_name,
        model_name_of,
        existing_dir,
        quality_key,
        quality_dir,
        profile_key,
        profile_dir,
        run_key,
        teacher_use,
        PAIR_SEP,
        pair_name,
        pair_dir,
        run_hash,
        run_dir,
        VariantDir,
        TeacherDir,
        split_hashed,
        split_pair,
        iter_variants,
        iter_teachers,
        check_writable,
    )

__all__ = [
    "dataset_key",
    "teacher_key",
    "teacher_id",
    "teacher_dir",
    "dir_name",
    "model_name_of",
    "existing_dir",
    "quality_key",
    "quality_dir",
    "profile_key",
    "profile_dir",
    "run_key",
    "teacher_use",
    "PAIR_SEP",
    "pair_name",
    "pair_dir",
    "run_hash",
    "run_dir",
    "VariantDir",
    "TeacherDir",
    "split_hashed",
    "split_pair",
    "iter_variants",
    "iter_teachers",
    "check_writable",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.artifacts.layout"), name)
    raise AttributeError(f"module 'common.artifacts' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
