"""Stage 3: find the finished runs, build the tables, write them and the plots (METHOD section 10).

This module only orchestrates; each concept has its own home:

    common/artifacts/discovery.py  which runs and teachers exist, their status, per-run numbers
    common/report/stats.py         the formulas: mean ± population std, ARI, epochs to target,
                                   baseline matching, the headroom rule
    common/report/tables.py        accuracy, headroom, epochs-to-target and unfinished tables (DataFrames)
    common/report/published.py     the CIFAR-100 top-1 published for the standard pairs (CRD, DKD tables)
    common/report/text.py          their Markdown and LaTeX, the opening sentences, the table files
    common/plots.py                accuracy curves and the S/I/E/Q profile figure
    common/report/exports.py       the table of exported students (once `make export` has run)
    common/report/page.py          report.html: all of the above in one offline page

Only finished runs (a `done` file) are averaged; the others are listed in a table of their own
with their status (see `common.artifacts.discovery.run_status`). Directory layout: common/artifacts/layout.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from common.artifacts.discovery import find_runs, find_teachers, finished_runs, stage_outputs
from common.errors import DataError
from common.report.exports import write_export_tables
from common.plots import plot_accuracy_curves, plot_all_profiles
from common.report.stats import BASELINE
from common.files import atomic_write_text
from common.report.text import (
    accuracy_markdown, epochs_markdown, headroom_markdown, opening_sentences, replaced_images_markdown, unfinished_markdown, write_tables,
)
from common.report.tables import accuracy_table, epochs_to_target, headroom_table, unfinished_table

def run(
    artifacts: Path,
    out_dir: Path,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    target: float | None = None,
    drop_outliers: bool = False,
) -> dict[str, Any]:
    """Stage 3: find runs, build the tables, write them and the plots under `out_dir`.

    With a `methods` filter the CE student is always kept (gains, ARI and targets need it).
    Returns {runs, teachers, accuracy, headroom, epochs_to_target, unfinished: DataFrames;
    markdown: {name: text}; files: {name: Path}; plots: [Path]}.
    """
    artifacts = Path(artifacts)
    if not artifacts.is_dir():
        raise DataError(f"artifacts directory {artifacts} not found; pass the directory stages 1-2 wrote to (artifacts=...)")
    datasets = list(datasets) if datasets is not None else None
    wanted = sorted(set(methods) | {BASELINE}) if methods is not None else None
    runs = find_runs(artifacts, datasets=datasets, pairs=pairs, methods=wanted)
    if runs.empty:
        everything = find_runs(artifacts)
        if everything.empty:
            raise DataError(f"no student runs under {artifacts} (expected <dataset>/<teacher>__<student>/<method>-<hash>/seed<k>); run stage 2 first")
        raise DataError(
            f"no runs match the filters; available datasets: {', '.join(sorted(everything['dataset'].unique()))}; "
            f"pairs: {', '.join(sorted(everything['pair'].unique()))}; methods: {', '.join(sorted(everything['method'].unique()))}"
        )
    teachers = find_teachers(artifacts, datasets=datasets)
    accuracy = accuracy_table(runs, teachers=teachers, drop_outliers=drop_outliers)
    ett = epochs_to_target(runs, target=target)
    unfinished = unfinished_table(runs, teachers)
    out_dir = Path(out_dir)
    headroom = headroom_table(accuracy)
    finished = finished_runs(runs)
    opening = opening_sentences(accuracy, finished, stage_outputs(finished))
    files = write_tables(accuracy, ett, unfinished, out_dir, headroom=headroom, opening=opening)
    plots = plot_accuracy_curves(runs, out_dir / "plots", teachers=teachers)
    plots += plot_all_profiles(artifacts, out_dir / "plots", datasets=datasets)
    markdown = {"accuracy": opening + accuracy_markdown(accuracy), "headroom": headroom_markdown(headroom),
                "epochs_to_target": epochs_markdown(ett)}
    if not unfinished.empty:
        markdown["unfinished"] = unfinished_markdown(unfinished)
    replaced = replaced_images_markdown(finished_runs(runs), teachers)
    if replaced:  # dataset.bad_images=skip replaced files somewhere: never silent
        markdown["replaced_images"] = replaced
        files["replaced_images.md"] = out_dir / "replaced_images.md"
        atomic_write_text(files["replaced_images.md"], replaced)
    else:
        (out_dir / "replaced_images.md").unlink(missing_ok=True)
    export_md, export_files = write_export_tables(runs, out_dir, accuracy)
    files.update(export_files)
    if export_md:
        markdown["export"] = export_md
    return dict(runs=runs, teachers=teachers, accuracy=accuracy, headroom=headroom, epochs_to_target=ett,
                unfinished=unfinished, markdown=markdown, files=files, plots=plots)
