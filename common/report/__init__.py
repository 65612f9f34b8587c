"""Stage 3: accuracy and epochs-to-target tables, plots, report.html. Imports no torch.

    runner          the stage-3 pipeline (`run`)
    stats           mean/std over seeds, epochs to a target, ranks
    tables          the tables as DataFrames
    text            Markdown/LaTeX formatting of the tables
    page            report.html
    exports         the table of exported students
    published       the CIFAR-100 numbers the CRD and DKD papers report (published_cifar100.csv)

`common.report` keeps the import path of the former module common/report.py: its public names
are those of `common.report.runner`, loaded on first use (PEP 562), so that importing one
submodule does not import the whole package (stage 3 stays torch-free, cycles stay out).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.report.runner import (  # noqa: F401
        run,
    )

__all__ = [
    "run",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("common.report.runner"), name)
    raise AttributeError(f"module 'common.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
