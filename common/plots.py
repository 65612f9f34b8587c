"""The project's PNG plots: stage 3's accuracy curves and the S/I/E/Q profile figure (also drawn
by stage 1), plus what every plot shares: the S/I/E/Q colours (`QUALITY_STYLE`), file-safe
names (`safe_filename`) and the atomic PNG writer (`save_png`), used by the layer study too.

Matplotlib's object API only (no pyplot state); PNGs are rendered by Agg.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.artifacts.discovery import find_profiles, finished_runs, read_metrics, read_yaml_dict
from common.artifacts.layout import model_name_of
from common.files import atomic_write
from common.report.text import pair_label

QUALITY_STYLE = {  # colours of the paper's figure (Plotfigs.CPlotTeacherLayerSelection)
    "S": ("separation S", "midnightblue"),
    "I": ("information I", "deepskyblue"),
    "E": ("efficiency E", "red"),
    "Q": ("knowledge quality Q", "dimgrey"),
}


def safe_filename(name: str) -> str:
    """`name` with every run of characters outside [A-Za-z0-9_.+-] as one '_' (e.g. 'tv:resnet18' -> 'tv_resnet18')."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def save_png(fig: Figure, path: Path) -> None:
    """A plot, written atomically like every other artifact (a killed run leaves no half PNG)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_accuracy_curves(runs: pd.DataFrame, out_dir: Path, *, teachers: pd.DataFrame | None = None) -> list[Path]:
    """Per dataset x pair: test accuracy vs epoch per method, mean line and ± std band (ddof=0)
    over the finished runs; a dashed line at the teacher's best accuracy when `teachers` is given.
    Writes curves_<dataset>_<pair>.png; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = finished_runs(runs)
    paths = []
    for (dataset, pair), pair_runs in done.groupby(["dataset", "pair"]):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        labels = pair_runs[["method", "variant"]].drop_duplicates()
        many = labels["method"].duplicated(keep=False)
        for (_, lab), is_many in zip(labels.iterrows(), many):
            group = pair_runs[(pair_runs["method"] == lab["method"]) & (pair_runs["variant"] == lab["variant"])]
            curves = [m.set_index("epoch")["test_acc"] for m in map(read_metrics, map(Path, group["path"])) if m is not None]
            if not curves:
                continue
            wide = pd.concat(curves, axis=1)
            mean, std = wide.mean(axis=1), wide.std(axis=1, ddof=0)
            name = f"{lab['method']}-{lab['variant']}" if is_many else lab["method"]
            line = ax.plot(wide.index, mean, label=f"{name} (n={len(curves)})")[0]
            ax.fill_between(wide.index, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if teachers is not None and not teachers.empty:
            ids = set(pair_runs["teacher_id"].dropna())
            t = teachers[(teachers["dataset"] == dataset) & (teachers["status"] == "finished")]
            t = t[t["teacher_id"].isin(ids)] if ids else t[t["teacher"] == pair_runs["teacher"].iloc[0]]
            for _, row in t.iterrows():
                ax.axhline(row["best_test_acc"], color="black", linestyle="--", linewidth=1, label=f"teacher {row['variant']}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: {pair_label(pair)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"curves_{safe_filename(dataset)}_{safe_filename(pair)}.png"
        save_png(fig, path)
        paths.append(path)
    return paths


def plot_quality(quality: pd.DataFrame, selected: Sequence[int], path: Path, title: str = "Knowledge quality") -> Path:
    """S, I, E and Q against the generalized-layer index on shared axes (the paper's figure,
    METHOD 7.1), the selected teacher layers marked with crosses on the Q curve."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = quality["layer"].to_numpy() if "layer" in quality else np.arange(len(quality))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for column, (label, colour) in QUALITY_STYLE.items():
        if column in quality:
            ax.plot(layers, quality[column].to_numpy(dtype=float), color=colour, linewidth=2, label=label)
    chosen = [i for i in selected if i in set(layers.tolist())]
    if chosen and "Q" in quality:
        q = quality.set_index(pd.Index(layers))["Q"]
        ax.scatter(chosen, q.loc[chosen].to_numpy(dtype=float), marker="x", s=120, color="black", zorder=3,
                   label="selected")
    ax.set_xlabel("generalized layer index")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("metric")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # Beside the axes, not on them: four curves over every layer leave no empty corner to put it in.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    save_png(fig, path)
    return path


def plot_all_profiles(artifacts: Path, out_dir: Path, *, datasets: Iterable[str] | None = None) -> list[Path]:
    """plot_quality for every profile (`discovery.find_profiles`); selected layers from
    selection.yaml (else the csv's `selected` column). Writes quality_<dataset>_<teacher_id>_<profile>.png."""
    out_dir = Path(out_dir)
    paths = []
    for profile in find_profiles(artifacts, datasets=datasets):
        quality = pd.read_csv(profile / "quality.csv")
        selection = read_yaml_dict(profile / "selection.yaml")
        selected = selection.get("layers")
        if selected is None and "selected" in quality:
            flags = quality["selected"].astype(str).str.lower().isin(["true", "1"])
            selected = quality.loc[flags, "layer"].tolist()
        dataset, teacher_id = profile.parent.parent.name, model_name_of(profile.parent.name)
        title = f"{teacher_id} on {dataset}"
        if selection.get("criterion") is not None:
            title += f" (top-{selection.get('k')} by {selection['criterion']})"
        name = f"quality_{safe_filename(dataset)}_{safe_filename(teacher_id)}_{safe_filename(profile.name)}.png"
        paths.append(plot_quality(quality, [int(i) for i in selected or []], out_dir / name, title=title))
    return paths
