"""Generalized layers: splitting a model into them, capturing their outputs, and their tables.

    hooks           layer chains, generalized layers, feature extraction by forward hooks, LayerInfo tables
    tables          the layer tables of a configured model (what stage 1 and 2 check layer indices against)
    pairing         the student-layer maps: which student layer each teacher layer goes to (pure functions)

`common.layers` keeps the import path of the former module common/layers.py: its public names
are those of `common.layers.hooks`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.layers.hooks import (  # noqa: F401
        BOUNDARY_TYPES,
        BOUNDARY_CLASS_NAMES,
        is_boundary,
        LayerChain,
        layer_chain,
        linearize,
        GenLayer,
        generalized_layers,
        resolve_layers,
        head_position,
        backbone_and_head_parameters,
        modules_after,
        capture,
        extract,
        forward_with_features,
        LayerInfo,
        layer_infos,
    )

__all__ = [
    "BOUNDARY_TYPES",
    "BOUNDARY_CLASS_NAMES",
    "is_boundary",
    "LayerChain",
    "layer_chain",
    "linearize",
    "GenLayer",
    "generalized_layers",
    "resolve_layers",
    "head_position",
    "backbone_and_head_parameters",
    "modules_after",
    "capture",
    "extract",
    "forward_with_features",
    "LayerInfo",
    "layer_infos",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.layers.hooks"), name)
    raise AttributeError(f"module 'common.layers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
