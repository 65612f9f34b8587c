"""Exporting finished students to ONNX and TorchScript, with a match check and latency.

    runner          export_run/export_all
    files           writing the exported files and checking they agree
    record          the export record that makes a rerun skip valid work
    latency         MACs, parameters and CPU latency
    __main__        `python -m common.export`

`common.export` keeps the import path of the former module common/export.py: its public names
are those of `common.export.runner`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.export.runner import (  # noqa: F401
        BATCH_SIZES,
        TOLERANCE,
        MACS_NOTE,
        ExportSettings,
        ExportResult,
        run_settings,
        export_run,
        export_all,
        body,
    )

__all__ = [
    "BATCH_SIZES",
    "TOLERANCE",
    "MACS_NOTE",
    "ExportSettings",
    "ExportResult",
    "run_settings",
    "export_run",
    "export_all",
    "body",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.export.runner"), name)
    raise AttributeError(f"module 'common.export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
