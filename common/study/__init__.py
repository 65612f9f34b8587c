"""The layer study: which teacher layers transfer best, and does Q rank them?

    runner          collecting the study's runs into tables and findings (`run`, `main`)
    plan            the arms of the study (which layer lists to train)
    stats           rank correlations with bootstrap intervals
    text            the study's Markdown and plots
    __main__        `python -m common.study plan|report`

`common.study` keeps the import path of the former module common/study.py: its public names
are those of `common.study.runner`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.study.runner import (  # noqa: F401
        OURS_WORDS,
        collect_runs,
        layer_results,
        correlation_table,
        control_table,
        findings,
        mismatches,
        default_out,
        run,
        write_files,
        parse_layers,
        add_plan_flags,
        plan_options,
        main,
    )

__all__ = [
    "OURS_WORDS",
    "collect_runs",
    "layer_results",
    "correlation_table",
    "control_table",
    "findings",
    "mismatches",
    "default_out",
    "run",
    "write_files",
    "parse_layers",
    "add_plan_flags",
    "plan_options",
    "main",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.study.runner"), name)
    raise AttributeError(f"module 'common.study' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
