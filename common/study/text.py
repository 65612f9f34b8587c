"""How the layer-selection study is shown: its Markdown report and its two figures.

Pure presentation of the tables `common.study.runner` builds (`layer_results`, `correlation_table`,
`control_table`, the findings and the runs); no numbers are computed here beyond formatting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from common.plots import QUALITY_STYLE, save_png
from common.study.plan import StudyPlan
from common.study.stats import LEVEL
from common.report.text import markdown_table


# ----------------------------------------------------------------------------- markdown


def _pm(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _ci(low: float, high: float) -> str:
    return "undefined" if math.isnan(low) or math.isnan(high) else f"{low:+.2f} to {high:+.2f}"


def study_markdown(title: str, headroom: str, plan: StudyPlan, layers: pd.DataFrame, correlations: pd.DataFrame,
                   controls: pd.DataFrame, found: list[str], runs: pd.DataFrame, notes: list[str],
                   student_maps: pd.DataFrame | None = None) -> str:
    """layer_study.md: the findings, the four tables, the unfinished runs, notes, how to read it."""
    pct = f"{LEVEL * 100:g} %"
    parts = [f"# {title}\n", f"{headroom}\n",
             "Accuracy: best-epoch test accuracy (METHOD 10), mean ± population std over seeds, n = finished seeds.\n",
             "## Findings\n", "\n".join(f"- {s}" for s in found) + "\n", "## Single teacher layers\n"]
    rows = [[str(r.layer), str(r.module), str(r.student_layer), *(f"{getattr(r, c):.4f}" for c in ("S", "I", "E", "Q")),
             "yes" if r.top_k_Q else "", _pm(r.acc_mean, r.acc_std), str(r.n), _opt(r.rank_Q), _opt(r.rank_acc)]
            for r in layers.itertuples()]
    parts.append(markdown_table(["layer", "module", "student layer", "S", "I", "E", "Q", f"Q top-{plan.k}",
                                 "accuracy (%)", "n", "rank by Q", "rank by accuracy"], rows))
    parts.append(f"\n## Rank correlation with single-layer accuracy (Spearman, {pct} bootstrap CI over seeds)\n")
    rows = [[r.criterion, "-" if math.isnan(r.rho) else f"{r.rho:+.2f}", _ci(r.low, r.high), str(r.n_layers)]
            for r in correlations.itertuples()]
    parts.append(markdown_table(["criterion", "rho", f"{pct} CI", "layers"], rows))
    parts.append(f"\n## Multi-layer controls vs ours (ours minus control, paired over seeds, {pct} t-interval)\n")
    parts.append(_difference_table(controls, pct))
    parts.append("\n" + "\n".join(f"- {s}" for s in controls["sentence"].dropna()) + "\n")
    if student_maps is not None and len(student_maps) > 1:
        parts.append(f"\n## Student-layer maps vs ours (Q's teacher layers fixed; ours minus map, paired over seeds, {pct} t-interval)\n")
        parts.append(_difference_table(student_maps, pct))
        parts.append("\n" + "\n".join(f"- {s}" for s in student_maps["sentence"].dropna()) + "\n")
    unfinished = runs[runs["status"] != "finished"]
    if not unfinished.empty:
        parts.append("\n## Runs not finished (not averaged)\n")
        parts.append(markdown_table(["arm", "seed", "status", "error", "path"],
                                    [[r.arm, str(r.seed), r.status, str(r.error or ""), r.path] for r in unfinished.itertuples()]))
    if notes:
        parts.append("\n## Notes\n\n" + "\n".join(f"- {s}" for s in notes) + "\n")
    parts.append(_HOW_TO_READ)
    return "\n".join(parts)


def _difference_table(table: pd.DataFrame, pct: str) -> str:
    """A `control_table` (controls or student maps) as Markdown: accuracy and ours minus each arm."""
    rows = [[r.arm, r.label, r.teacher_layers, r.student_layers or "(after seed 0's ce run)", _pm(r.acc_mean, r.acc_std), str(r.n),
             "" if r.arm == "ours" else ("-" if math.isnan(r.diff_mean) else f"{r.diff_mean:+.2f}"),
             "" if r.arm == "ours" else _ci(r.diff_low, r.diff_high)] for r in table.itertuples()]
    return markdown_table(["arm", "what", "teacher layers", "student layers", "accuracy (%)", "n", "ours − arm", f"{pct} CI"], rows)


def _opt(value: Any) -> str:
    return "-" if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) else str(value)


_HOW_TO_READ = """
## How to read this

- A single-layer arm distils one teacher layer into the student layer at the nearest relative depth, with CE on the
  detached head only (as `ours`). Its accuracy is that layer's measured transfer value; for a shallow student layer,
  everything above it is trained by CE alone, so depth and transfer are entangled.
- rho > 0 means the criterion ranks layers like their transfer value. The interval resamples seeds only: it says how
  sure the ranking is given these runs, not how it would change with another teacher; with 2-3 seeds per layer it
  is optimistic (a resample can only repeat the seeds there are), with one seed it is a single point.
- A student-map arm keeps ours' teacher layers and changes only the student layers they are distilled into
  (common/layers/pairing.py); `ours` is the baseline map. `student_q` uses the student's own Q, measured on seed 0's
  CE student for every seed.
- "ours − arm" is paired by seed. An interval containing 0 means no difference was detected at this number of
  seeds, not that there is none; with one seed the interval is undefined.
"""


# ----------------------------------------------------------------------------- plots


def plot_criteria(layers: pd.DataFrame, path: Path, title: str) -> Path:
    """S, I, E and Q (one panel each) against the single-layer accuracy, mean ± std over seeds,
    each point labelled with its teacher layer; Q's top-k layers filled."""
    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2).ravel()
    done = layers[layers["n"] > 0]
    for ax, (criterion, (label, colour)) in zip(axes, ((c, QUALITY_STYLE[c]) for c in ("Q", "S", "I", "E"))):
        for top, marker_face in ((True, colour), (False, "white")):
            part = done[done["top_k_Q"] == top]
            ax.errorbar(part[criterion], part["acc_mean"], yerr=part["acc_std"], fmt="o", color=colour,
                        markerfacecolor=marker_face, capsize=3, label="Q's top-k" if top else "other layers")
        for r in done.itertuples():
            ax.annotate(str(r.layer), (getattr(r, criterion), r.acc_mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("single-layer accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    return path


def plot_controls(controls: pd.DataFrame, path: Path, title: str) -> Path:
    """Ours minus each control (points) with its paired t-interval; right of 0: ours is better."""
    rows = controls[controls["arm"] != "ours"].iloc[::-1]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(rows))
    err = np.vstack([rows["diff_mean"] - rows["diff_low"], rows["diff_high"] - rows["diff_mean"]]).astype(float)
    ax.errorbar(rows["diff_mean"].astype(float), y, xerr=np.nan_to_num(err), fmt="o", color="dimgrey", capsize=3)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(y, rows["arm"])
    ax.set_xlabel(f"ours − control (points, {LEVEL * 100:g} % CI over paired seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_png(fig, path)
    return path
