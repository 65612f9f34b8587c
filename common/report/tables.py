"""Stage 3's tables as DataFrames, from the runs `common.artifacts.discovery` finds (METHOD section 10):

* `accuracy_table`: per dataset x pair x method-variant over FINISHED runs, best-epoch test
  accuracy (the paper's protocol: model selection on the test set), last-epoch accuracy and,
  with a validation split, the test accuracy at the best validation epoch; mean and population
  std (ddof=0); the gain over the matched CE student; ARI on the rows of ours; one teacher row
  per pair, whose gain is its headroom; the published top-1 of the same pair and method where
  the CRD / DKD tables have one (`common.report.published`);
* `headroom_table`: teacher minus CE student per pair, with the verdict of
  `report_stats.headroom_too_small` in words;
* `epochs_to_target`: epochs and wall-clock time to reach the CE student's best accuracy;
* `unfinished_table`: running, failed, interrupted and missing runs and teachers, never averaged.

The formulas are in `common.report.stats`; the text of each table in `common.report.text`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from common.artifacts.discovery import finished_runs, read_metrics
from common.report.published import published_top1
from common.report.stats import BASELINE, OURS, TEACHER, ari, ari_text, drop_outlier_runs, epochs_to_reach, headroom_too_small, is_competitor, match_baseline, mean_std, method_rank
from common.report.text import headroom_sentence

_GROUP = ["dataset", "pair", "method", "variant"]
_STATS = {"best": "best_test_acc", "last": "last_test_acc", "best_val": "test_at_best_val"}

ACCURACY_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_runs", "n_dropped",
    "best_mean", "best_std", "last_mean", "last_std", "best_val_mean", "best_val_std",
    "ce_variant", "gain_best", "gain_last", "gain_best_val", "ari", "ari_text", "published", "published_source",
]
HEADROOM_COLUMNS = [
    "dataset", "pair", "teacher_variant", "teacher_acc", "ce_variant", "ce_mean", "ce_std", "n_ce",
    "headroom", "too_small", "sentence",
]
EPOCHS_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_runs", "best_curve_acc", "target",
    "target_source", "total_epochs", "reached", "epoch", "epochs_saved_pct", "time_to_target_s",
]
UNFINISHED_COLUMNS = ["dataset", "pair", "method", "variant", "seed", "status", "epochs", "error", "path"]


# ----------------------------------------------------------------------------- accuracy


def accuracy_table(
    runs: pd.DataFrame,
    *,
    teachers: pd.DataFrame | None = None,
    drop_outliers: bool = False,
    ours: str = OURS,
    competitors: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per dataset x pair x method-variant over FINISHED runs, plus one teacher row per pair.

    Columns: n_runs, n_dropped, {best,last,best_val}_{mean,std} (population std, ddof=0),
    ce_variant (the matched CE baseline, see `match_baseline`), gain_{best,last,best_val}
    (mean minus the matched CE mean, points), ari / ari_text (on the rows of `ours` only; see
    `ari`, `is_competitor`). Teacher rows: method 'teacher', the teacher's best-epoch accuracy
    (from `teachers`, see `find_teachers`), std NaN (a single run, as the paper reports it).
    published / published_source: the CIFAR-100 top-1 the CRD or DKD tables report for this
    pair and method, and its citation (`published_top1`); NaN and '' elsewhere.
    """
    done = finished_runs(runs)
    rows = []
    for key, group in done.groupby(_GROUP, sort=True):
        dataset, pair, method, variant = key
        kept = drop_outlier_runs(group["best_test_acc"]) if drop_outliers else np.ones(len(group), bool)
        used = group[kept]
        row: dict[str, Any] = dict(
            dataset=dataset, pair=pair, teacher=group["teacher"].iloc[0], student=group["student"].iloc[0],
            method=method, variant=variant, n_runs=int(kept.sum()), n_dropped=int((~kept).sum()),
            regime=group["regime"].dropna().iloc[0] if group["regime"].notna().any() else None,
        )
        for name, column in _STATS.items():
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(used[column])
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=ACCURACY_COLUMNS)
    table = pd.DataFrame(rows + _teacher_rows(done, teachers))
    table = _add_gains(table)  # the teacher's gain is its headroom over the CE student (METHOD 0.10)
    table = _add_ari(table, ours, competitors)
    table = _add_published(table)
    table["_rank"] = table["method"].map(lambda m: method_rank(m, ours))
    table = table.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)
    return table[ACCURACY_COLUMNS]


def _add_gains(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["ce_variant"] = None
    for name in _STATS:
        table[f"gain_{name}"] = float("nan")
    for (_, _), pair_rows in table.groupby(["dataset", "pair"]):
        ce = pair_rows[pair_rows["method"] == BASELINE]
        for idx, row in pair_rows.iterrows():
            chosen = row["variant"] if row["method"] == BASELINE else match_baseline(row["regime"], ce)
            if chosen is None:
                continue
            ref = ce[ce["variant"] == chosen].iloc[0]
            table.at[idx, "ce_variant"] = chosen
            for name in _STATS:
                table.at[idx, f"gain_{name}"] = row[f"{name}_mean"] - ref[f"{name}_mean"]
    return table


def _add_ari(table: pd.DataFrame, ours: str, competitors: Iterable[str] | None) -> pd.DataFrame:
    table = table.copy()
    table["ari"] = float("nan")
    table["ari_text"] = ""
    comp = list(competitors) if competitors is not None else None
    for (_, _), pair_rows in table.groupby(["dataset", "pair"]):
        mask = pair_rows["method"].map(lambda m: is_competitor(m, ours, BASELINE, comp))
        deltas = pair_rows.loc[mask, "gain_best"].tolist()
        for idx in pair_rows.index[pair_rows["method"] == ours]:
            value = ari(float(table.at[idx, "gain_best"]), deltas)
            table.at[idx, "ari"] = value
            table.at[idx, "ari_text"] = ari_text(value)
    return table


def _add_published(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    found = [published_top1(r.dataset, r.teacher, r.student, r.method) for r in table.itertuples()]
    table["published"] = [p.top1 if p is not None else float("nan") for p in found]
    table["published_source"] = [p.source if p is not None else "" for p in found]
    return table


def _teacher_rows(done: pd.DataFrame, teachers: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The teacher's best-epoch accuracy for every pair: the teachers its runs name in
    config.yaml (run.teacher_id), else every finished teacher dir of that model on the dataset."""
    if teachers is None or teachers.empty or done.empty:
        return []
    finished = teachers[teachers["status"] == "finished"]
    rows = []
    for (dataset, pair), group in done.groupby(["dataset", "pair"]):
        named = set(group["teacher_id"].dropna())
        candidates = finished[finished["dataset"] == dataset]
        if named:
            candidates = candidates[candidates["teacher_id"].isin(named)]
        else:
            candidates = candidates[candidates["teacher"] == group["teacher"].iloc[0]]
        for _, t in candidates.iterrows():
            row = dict(dataset=dataset, pair=pair, teacher=group["teacher"].iloc[0],
                       student=group["student"].iloc[0], method=TEACHER, variant=t["variant"],
                       n_runs=1, n_dropped=0, regime=None)
            for name, column in _STATS.items():
                row[f"{name}_mean"], row[f"{name}_std"] = float(t[column]), float("nan")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- headroom


def headroom_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per pair and teacher: teacher best-epoch accuracy minus the matched CE student's mean
    (the teacher row's gain, see `_add_gains`), the CE student's std and n, `too_small` by
    `headroom_too_small`, and the sentence stage 3 prints (`table_format.headroom_sentence`)."""
    rows = []
    for _, t in accuracy[accuracy["method"] == TEACHER].iterrows():
        ce = accuracy[(accuracy["dataset"] == t["dataset"]) & (accuracy["pair"] == t["pair"])
                      & (accuracy["method"] == BASELINE) & (accuracy["variant"] == t["ce_variant"])]
        ce_mean, ce_std, n_ce = (float(ce["best_mean"].iloc[0]), float(ce["best_std"].iloc[0]), int(ce["n_runs"].iloc[0])) \
            if len(ce) else (float("nan"), float("nan"), 0)
        headroom = float(t["best_mean"]) - ce_mean
        rows.append(dict(dataset=t["dataset"], pair=t["pair"], teacher_variant=t["variant"], teacher_acc=float(t["best_mean"]),
                         ce_variant=t["ce_variant"], ce_mean=ce_mean, ce_std=ce_std, n_ce=n_ce, headroom=headroom,
                         too_small=bool(len(ce)) and headroom_too_small(headroom, ce_std),
                         sentence=headroom_sentence(t["pair"], float(t["best_mean"]), ce_mean, ce_std, n_ce)))
    return pd.DataFrame(rows, columns=HEADROOM_COLUMNS)


# ----------------------------------------------------------------------------- epochs to target


def epochs_to_target(runs: pd.DataFrame, target: float | None = None) -> pd.DataFrame:
    """Epochs (and wall-clock time) each method needs to reach the CE student's best accuracy.

    METHOD 10: curve = max over the method's finished runs of test accuracy at each epoch;
    target R = max of the matched CE student's curve (or the explicit `target`); epoch = first
    epoch (1-based) with curve >= R, missing when never reached; epochs_saved_pct =
    100 * (1 - epoch / total_epochs); time_to_target_s = mean over the runs of elapsed_s at that
    epoch.
    """
    done = finished_runs(runs)
    curves: dict[tuple, pd.DataFrame] = {}
    info = []
    for key, group in done.groupby(_GROUP, sort=True):
        per_run = [m.set_index("epoch") for m in (read_metrics(Path(p)) for p in group["path"]) if m is not None]
        curves[key] = pd.concat({i: m for i, m in enumerate(per_run)}, names=["run", "epoch"]) if per_run else None
        info.append(dict(zip(_GROUP, key), teacher=group["teacher"].iloc[0], student=group["student"].iloc[0],
                         n_runs=len(group), regime=group["regime"].dropna().iloc[0] if group["regime"].notna().any() else None))
    if not info:
        return pd.DataFrame(columns=EPOCHS_COLUMNS)
    table = pd.DataFrame(info)
    rows = []
    for _, row in table.iterrows():
        key = tuple(row[c] for c in _GROUP)
        long = curves[key]
        curve = long["test_acc"].groupby("epoch").max() if long is not None else pd.Series(dtype=float)
        ref_target, source = _target_for(row, table, curves, target)
        epoch = epochs_to_reach(curve.to_numpy(), ref_target) if not math.isnan(ref_target) else None
        total = int(curve.index.max()) if len(curve) else 0
        reached_at = int(curve.index[epoch - 1]) if epoch is not None else None
        time_s = float("nan")
        if reached_at is not None and long is not None and "elapsed_s" in long:
            time_s = float(long["elapsed_s"].xs(reached_at, level="epoch").mean())
        rows.append(dict(
            {c: row[c] for c in ["dataset", "pair", "teacher", "student", "method", "variant", "n_runs"]},
            best_curve_acc=float(curve.max()) if len(curve) else float("nan"),
            target=ref_target, target_source=source, total_epochs=total,
            reached=None if math.isnan(ref_target) else reached_at is not None,
            epoch=reached_at,
            epochs_saved_pct=100.0 * (1 - reached_at / total) if reached_at is not None else float("nan"),
            time_to_target_s=time_s,
        ))
    out = pd.DataFrame(rows, columns=EPOCHS_COLUMNS)
    out["epoch"] = out["epoch"].astype("Int64")  # nullable: "not reached" stays missing
    out["_rank"] = out["method"].map(lambda m: method_rank(m, OURS))
    return out.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)[EPOCHS_COLUMNS]


def _target_for(row: pd.Series, table: pd.DataFrame, curves: dict, target: float | None) -> tuple[float, str]:
    if target is not None:
        return float(target), "explicit"
    ce = table[(table["dataset"] == row["dataset"]) & (table["pair"] == row["pair"]) & (table["method"] == BASELINE)]
    chosen = row["variant"] if row["method"] == BASELINE else match_baseline(row["regime"], ce)
    if chosen is None:
        return float("nan"), "no ce runs"
    long = curves[(row["dataset"], row["pair"], BASELINE, chosen)]
    if long is None:
        return float("nan"), "no ce runs"
    return float(long["test_acc"].groupby("epoch").max().max()), f"{BASELINE}-{chosen}"


# ----------------------------------------------------------------------------- unfinished


def unfinished_table(runs: pd.DataFrame, teachers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Runs (and teachers) that are running, failed, interrupted or missing: never averaged,
    listed here with the epochs they finished and, for failed ones, the error."""
    columns = UNFINISHED_COLUMNS
    parts = [runs.loc[runs["status"] != "finished", columns]]
    if teachers is not None and not teachers.empty:
        t = teachers[teachers["status"] != "finished"]
        parts.append(pd.DataFrame(dict(dataset=t["dataset"], pair=t["teacher_id"], method=TEACHER,
                                       variant=t["variant"], seed=None, status=t["status"],
                                       epochs=t["epochs"], error=t["error"], path=t["path"])))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)
