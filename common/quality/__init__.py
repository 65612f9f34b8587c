"""The knowledge-quality metric Q = S + sqrt(I * E) of a layer, in memory and streamed.

    formulas        S, I, E and Q as pure functions of features and labels; `layer_quality` is the entry point for one layer
    stream          the same statistics accumulated batch by batch under a memory budget (stage 1 at dataset scale)
    table           `quality_table`: the S/I/E/Q table and top-k of any model's layers, from Python (stage 1's streaming)

`common.quality` keeps the import path of the former module common/quality.py: its public names
are those of `common.quality.formulas`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.quality.formulas import (  # noqa: F401
        MAX_DIMENSION,
        VARIANCE_THRESHOLD,
        ENTROPY_NORMALISER,
        draw_subsets,
        flatten_features,
        gram_matrix,
        accumulate_gram,
        symmetrize_gram,
        MinDistanceResolver,
        class_geometry,
        geometry_from_gram,
        class_spectra,
        class_spectrum,
        explained_variance_rows,
        class_entropies,
        separation,
        information,
        efficiency_factor,
        efficiency,
        knowledge_quality,
        layer_stats,
        statistics_to_quality,
        layer_quality,
        select_layers,
    )
    from common.quality.table import quality_table  # noqa: F401

__all__ = [
    "MAX_DIMENSION",
    "VARIANCE_THRESHOLD",
    "ENTROPY_NORMALISER",
    "draw_subsets",
    "flatten_features",
    "gram_matrix",
    "accumulate_gram",
    "symmetrize_gram",
    "MinDistanceResolver",
    "class_geometry",
    "geometry_from_gram",
    "class_spectra",
    "class_spectrum",
    "explained_variance_rows",
    "class_entropies",
    "separation",
    "information",
    "efficiency_factor",
    "efficiency",
    "knowledge_quality",
    "layer_stats",
    "statistics_to_quality",
    "layer_quality",
    "select_layers",
    "quality_table",
]


def __getattr__(name: str) -> Any:
    if name == "quality_table":
        return importlib.import_module("common.quality.table").quality_table
    if name in __all__:
        return getattr(importlib.import_module("common.quality.formulas"), name)
    raise AttributeError(f"module 'common.quality' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
