"""Stage 3: accuracy tables, epochs-to-target, and plots from finished run directories.

Implements METHOD section 10 with the reporting decisions of section 0 item 8:

* per run: best-epoch test accuracy (the paper's protocol: model selection on the test set), the
  last-epoch test accuracy and, when a validation split exists, the test accuracy at the epoch of
  the best validation accuracy;
* across the runs of one method: mean and POPULATION std (ddof=0, as the reference's np.std);
  the reference's "drop runs more than 1 pt below the best run" rule only with `drop_outliers`;
* gain over the CE student, ARI (METHOD 10), epochs-to-target and wall-clock time to target;
* headroom: teacher minus CE student per pair, and a plain warning when it is too small for a
  distillation gain to be told from seed noise (`headroom_too_small`).

Only finished runs (a `done` file) are averaged; the others are listed in a table of their own
with a status: `running` (a live process holds the run's lock), `failed` (a `failed` file: the
run crashed, its error is shown), `interrupted` (killed: rerunning the command resumes it) or
`missing` (a configured seed with no directory). Directory layout (see common/artifacts.py):

    <artifacts>/<dataset>/<teacher>__<student>/<method>-<hash8>/seed<k>/{config.yaml,metrics.csv,done|failed}
    <artifacts>/<dataset>/<teacher>-<hash8>/{config.yaml,metrics.csv,done}
    <artifacts>/<dataset>/<teacher>-<hash8>/profile-<hash8>/{quality.csv,selection.yaml}
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure  # object API: no pyplot state, PNGs rendered by Agg
from matplotlib.ticker import MaxNLocator

from common.errors import DataError
from common.io import atomic_write, atomic_write_text, lock_held

BASELINE = "ce"  # the CE-only student every method is compared with
OURS = "ours"
TEACHER = "teacher"  # method label of the teacher rows of the accuracy table
ARI_CUTOFF = 0.5  # METHOD 10: only competitors with Delta_m >= 0.5 pt enter the ARI
ARI_MAX = 15.0  # METHOD 10: ARI outside (0, 15) is shown as "unstable"
OUTLIER_TOLERANCE = 1.0  # METHOD 10: runs more than 1 pt below the best run are outliers
# Headroom (issue 10 item 3): teacher minus CE student, best-epoch accuracy. Below the larger of
# 1 point and twice the CE student's seed std, a distilled student cannot show a gain that is
# told apart from seed noise: the report says so.
HEADROOM_MIN_POINTS = 1.0
HEADROOM_STD_FACTOR = 2.0

# Settings of a run that do not define its training regime; ignored when matching a method to
# its CE baseline. `lr` is ignored on purpose: the reference gives KD students another peak LR
# than their CE baseline (METHOD 8.7), so the LR must not pull the match elsewhere.
_REGIME_IGNORED = {
    "dataset": {"root", "download"},
    "train": {"seed", "lr", "device", "progress", "eval_batch_size", "teacher_source"},
}

_RUN_COLUMNS = [
    "dataset", "teacher", "student", "pair", "method", "variant", "seed", "status", "error",
    "teacher_id", "best_test_acc", "best_epoch", "last_test_acc", "test_at_best_val", "epochs",
    "total_time_s", "regime", "path",
]
_SEED_DIR = re.compile(r"^seed(\d+)$")
_GROUP = ["dataset", "pair", "method", "variant"]
_STATS = {"best": "best_test_acc", "last": "last_test_acc", "best_val": "test_at_best_val"}


# ----------------------------------------------------------------------------- one run


def read_metrics(run_dir: Path) -> pd.DataFrame | None:
    """The run's metrics.csv sorted by epoch, or None when it is missing or empty."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if metrics.empty:
        return None
    return metrics.sort_values("epoch").reset_index(drop=True) if "epoch" in metrics else metrics


def run_summary(metrics: pd.DataFrame | None) -> dict[str, float]:
    """Per-run numbers of METHOD section 0 item 8 from one metrics table.

    best_test_acc: max over epochs (the paper's protocol, METHOD 10); best_epoch: the first epoch
    reaching it; test_at_best_val: test accuracy at the first epoch of max val_acc (NaN without a
    validation split); total_time_s: cumulative training time at the last epoch.
    """
    nan = float("nan")
    if metrics is None or metrics.empty or "test_acc" not in metrics or "epoch" not in metrics:
        return dict(best_test_acc=nan, best_epoch=nan, last_test_acc=nan, test_at_best_val=nan,
                    epochs=0, total_time_s=nan)
    test = metrics["test_acc"].astype(float)
    best_row = int(np.nanargmax(test.to_numpy())) if test.notna().any() else None
    val = metrics["val_acc"].astype(float) if "val_acc" in metrics else None
    at_best_val = nan
    if val is not None and val.notna().any():
        at_best_val = float(test.iloc[int(np.nanargmax(val.to_numpy()))])
    if "elapsed_s" in metrics:
        total_time = float(metrics["elapsed_s"].iloc[-1])
    elif "epoch_time_s" in metrics:
        total_time = float(metrics["epoch_time_s"].sum())
    else:
        total_time = nan
    return dict(
        best_test_acc=float(test.iloc[best_row]) if best_row is not None else nan,
        best_epoch=float(metrics["epoch"].iloc[best_row]) if best_row is not None else nan,
        last_test_acc=float(test.iloc[-1]),
        test_at_best_val=at_best_val,
        epochs=int(metrics["epoch"].max()),
        total_time_s=total_time,
    )


def _status(run_dir: Path) -> tuple[str, str]:
    """(status, error) of a run or teacher directory.

    finished: a `done` file (written last); running: its `.lock` is held by a live process
    (stage 2 holds it while it trains the run, stage 1 while it trains the teacher); failed: a
    `failed` file, whose first line is the error; interrupted: none of these, so the process
    died (SIGKILL, a crash of the machine) and rerunning the command resumes it.
    """
    if (run_dir / "done").is_file():
        return "finished", ""
    if lock_held(run_dir / ".lock"):
        return "running", ""
    failed = run_dir / "failed"
    if failed.is_file():
        return "failed", _error_line(failed.read_text(errors="replace"))
    return "interrupted", ""


def _error_line(text: str) -> str:
    """The error of a `failed` file: its first line, or the last line of a bare traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(empty failed file)"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def _read_config(path: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict; {} when missing or unreadable (the report still lists it)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def regime(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run's training regime (used to match a CE baseline)."""
    out: dict[str, Any] = {}
    for section, ignored in _REGIME_IGNORED.items():
        for key, value in (config.get(section) or {}).items():
            if key not in ignored:
                out[f"{section}.{key}"] = value
    return out


def _split_name(name: str) -> tuple[str, str]:
    """'<name>-<hash8>' -> (name, hash8); names may hold '-' themselves."""
    head, sep, tail = name.rpartition("-")
    return (head, tail) if sep and head else (name, "")


# ----------------------------------------------------------------------------- discovery


def _normalize_pair(pair: str) -> str:
    return pair.replace("->", "__").replace(":", "__")


def _matches(method: str, variant: str, wanted: set[str] | None) -> bool:
    return wanted is None or method in wanted or f"{method}-{variant}" in wanted


def find_runs(
    artifacts: Path,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per student run directory (and per configured seed with no directory: 'missing').

    `pairs` take 'teacher__student' (or 'teacher->student'); `methods` take a method name or
    'method-hash8' for one variant. Columns: see `_RUN_COLUMNS`; `regime` is a JSON string of
    `regime(config)`, `error` the failure line of failed runs.
    """
    artifacts = Path(artifacts)
    want_ds = set(datasets) if datasets is not None else None
    want_pairs = {_normalize_pair(p) for p in pairs} if pairs is not None else None
    want_methods = set(methods) if methods is not None else None
    rows: list[dict[str, Any]] = []
    for ds_dir in _subdirs(artifacts):
        if want_ds is not None and ds_dir.name not in want_ds:
            continue
        for pair_dir in _subdirs(ds_dir):
            if "__" not in pair_dir.name or (want_pairs is not None and pair_dir.name not in want_pairs):
                continue
            teacher, student = pair_dir.name.split("__", 1)
            for variant_dir in _subdirs(pair_dir):
                method, variant = _split_name(variant_dir.name)
                if not _matches(method, variant, want_methods):
                    continue
                base = dict(dataset=ds_dir.name, teacher=teacher, student=student, pair=pair_dir.name,
                            method=method, variant=variant)
                rows.extend(_variant_rows(variant_dir, base))
    runs = pd.DataFrame(rows, columns=_RUN_COLUMNS)
    return runs.sort_values(["dataset", "pair", "method", "variant", "seed"], ignore_index=True)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []


def _variant_rows(variant_dir: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    configured: set[int] = set()
    for seed_dir in _subdirs(variant_dir):
        match = _SEED_DIR.match(seed_dir.name)
        if not match:
            continue
        config = _read_config(seed_dir / "config.yaml")
        configured.update(int(s) for s in config.get("seeds") or [] if isinstance(s, int))
        status, error = _status(seed_dir)
        metrics = read_metrics(seed_dir)
        if status == "finished" and (metrics is None or "test_acc" not in metrics or "epoch" not in metrics):
            status, error = "failed", "done, but metrics.csv is missing or lacks epoch/test_acc"
        rows.append(dict(
            base, seed=int(match.group(1)), status=status, error=error,
            teacher_id=(config.get("run") or {}).get("teacher_id"),
            regime=json.dumps(regime(config), sort_keys=True, default=str) if config else None,
            path=str(seed_dir), **run_summary(metrics),
        ))
    found = {row["seed"] for row in rows}
    for seed in sorted(configured - found):
        rows.append(dict(base, seed=seed, status="missing", error="", teacher_id=None, regime=None,
                         path=str(variant_dir / f"seed{seed}"), **run_summary(None)))
    return rows


def find_teachers(artifacts: Path, *, datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per teacher directory '<dataset>/<teacher>-<hash8>' holding a metrics.csv or config."""
    want_ds = set(datasets) if datasets is not None else None
    rows = []
    for ds_dir in _subdirs(Path(artifacts)):
        if want_ds is not None and ds_dir.name not in want_ds:
            continue
        for t_dir in _subdirs(ds_dir):
            if "__" in t_dir.name or not ((t_dir / "metrics.csv").is_file() or (t_dir / "config.yaml").is_file()):
                continue
            teacher, variant = _split_name(t_dir.name)
            status, error = _status(t_dir)
            rows.append(dict(dataset=ds_dir.name, teacher=teacher, teacher_id=t_dir.name, variant=variant,
                             status=status, error=error, path=str(t_dir), **run_summary(read_metrics(t_dir))))
    columns = ["dataset", "teacher", "teacher_id", "variant", "status", "error", "path", "best_test_acc",
               "best_epoch", "last_test_acc", "test_at_best_val", "epochs", "total_time_s"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------- math (METHOD 10)


def drop_outlier_runs(best: Sequence[float], tolerance: float = OUTLIER_TOLERANCE) -> np.ndarray:
    """Mask of runs kept by the reference's rule: best >= max(best) - tolerance (METHOD 10)."""
    best = np.asarray(best, dtype=float)
    return best >= np.nanmax(best) - tolerance if best.size else best.astype(bool)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and POPULATION std (ddof=0), as the reference's np.std (METHOD 10); NaNs ignored."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=0))


def ari(delta_ours: float, delta_competitors: Sequence[float], cutoff: float = ARI_CUTOFF) -> float:
    """ARI = mean over competitors m with Delta_m >= cutoff of Delta_ours / Delta_m (METHOD 10).

    Delta = accuracy - CE-student accuracy, in points. NaN when no competitor qualifies.
    """
    deltas = np.asarray([d for d in delta_competitors if not math.isnan(d) and d >= cutoff], dtype=float)
    if deltas.size == 0 or math.isnan(delta_ours):
        return float("nan")
    return float(np.mean(delta_ours / deltas))


def ari_text(value: float) -> str:
    """As the reference prints it: 'NN%' when 0 < ARI < 15, else 'unstable'; 'n/a' when undefined."""
    if math.isnan(value):
        return "n/a"
    return f"{value * 100:.0f}%" if 0 < value < ARI_MAX else "unstable"


def epochs_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose accuracy >= target, or None when never (METHOD 10 step 3).

    The reference returns the last epoch when the target is never reached; we keep it missing
    so that "not reached" is never mistaken for a number.
    """
    hits = np.flatnonzero(np.asarray(curve, dtype=float) >= target)
    return int(hits[0]) + 1 if hits.size else None


def is_competitor(method: str, ours: str = OURS, baseline: str = BASELINE,
                  competitors: Iterable[str] | None = None) -> bool:
    """Methods that enter the ARI: by default every method except the CE student, ours, the
    teacher, and our ablations (names that start with `ours`, e.g. ours_ce, ours_s). An explicit
    `competitors` list replaces the default rule."""
    if competitors is not None:
        return method in set(competitors)
    return method not in (baseline, TEACHER) and not method.startswith(ours)


def _regime_dict(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) and value else {}


def match_baseline(target_regime: str | None, candidates: pd.DataFrame) -> str | None:
    """Pick the CE variant whose regime matches `target_regime` best.

    Rule: the most equal keys among the regime settings (dataset and train sections without
    seed, lr, device and other runtime-only keys, see `_REGIME_IGNORED`); ties go to the variant
    with more finished runs, then to the lexicographically first hash. `candidates` has one row
    per CE variant with columns variant, regime, n_runs.
    """
    if candidates.empty:
        return None
    want = _regime_dict(target_regime)

    def score(row: dict[str, Any]) -> tuple[int, int, str]:
        have = _regime_dict(row["regime"])
        equal = sum(1 for k, v in want.items() if k in have and have[k] == v)
        return (-equal, -int(row["n_runs"]), str(row["variant"]))

    return str(min(candidates.to_dict("records"), key=score)["variant"])


# ----------------------------------------------------------------------------- tables


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "finished"]


def _method_rank(method: str, ours: str) -> int:
    """Row order within a pair: teacher, CE student, competitors, our ablations, ours."""
    if method == TEACHER:
        return 0
    if method == BASELINE:
        return 1
    if method == ours:
        return 4
    return 3 if method.startswith(ours) else 2


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
    """
    done = _finished(runs)
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
        return pd.DataFrame(columns=_ACCURACY_COLUMNS)
    table = pd.DataFrame(rows + _teacher_rows(done, teachers))
    table = _add_gains(table)  # the teacher's gain is its headroom over the CE student (METHOD 0.10)
    table = _add_ari(table, ours, competitors)
    table["_rank"] = table["method"].map(lambda m: _method_rank(m, ours))
    table = table.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)
    return table[_ACCURACY_COLUMNS]


_ACCURACY_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_runs", "n_dropped",
    "best_mean", "best_std", "last_mean", "last_std", "best_val_mean", "best_val_std",
    "ce_variant", "gain_best", "gain_last", "gain_best_val", "ari", "ari_text",
]


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


def headroom_too_small(headroom: float, ce_std: float) -> bool:
    """The rule of `HEADROOM_MIN_POINTS`: headroom < max(1 point, 2 x the CE student's
    population std over seeds); a NaN std (one seed) counts as 0, leaving the 1-point floor."""
    noise = 0.0 if math.isnan(ce_std) else HEADROOM_STD_FACTOR * ce_std
    return headroom < max(HEADROOM_MIN_POINTS, noise)


def headroom_sentence(pair: str, teacher_acc: float, ce_mean: float, ce_std: float, n_ce: int) -> str:
    """One plain sentence on a pair's headroom (teacher minus CE student, points)."""
    where = _pair_label(pair)
    if math.isnan(ce_mean):
        return f"{where}: no finished CE student runs, so the headroom is unknown; run `make distill METHOD=ce` with the same settings."
    headroom = teacher_acc - ce_mean
    ce = f"CE student {_pm(ce_mean, ce_std)} % over {n_ce} seed{'s' if n_ce != 1 else ''}"
    text = f"{where}: teacher {teacher_acc:.2f} %, {ce}, headroom {headroom:+.2f} points"
    if n_ce == 1:
        text += " (one CE seed: its seed noise is unknown)"
    if not headroom_too_small(headroom, ce_std):
        return text + "."
    floor = max(HEADROOM_MIN_POINTS, 0.0 if math.isnan(ce_std) else HEADROOM_STD_FACTOR * ce_std)
    return (f"{text}: **too small for distillation to show anything** (below {floor:.2f} points, the larger of "
            f"{HEADROOM_MIN_POINTS:g} point and {HEADROOM_STD_FACTOR:g}x the CE student's seed std); differences between "
            "methods here are mostly seed noise. Use a stronger teacher, a smaller student or less student training data.")


def headroom_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per pair and teacher: teacher best-epoch accuracy minus the matched CE student's mean
    (the teacher row's gain, see `_add_gains`), the CE student's std and n, `too_small` by
    `headroom_too_small`, and the sentence stage 3 prints."""
    columns = ["dataset", "pair", "teacher_variant", "teacher_acc", "ce_variant", "ce_mean", "ce_std", "n_ce",
               "headroom", "too_small", "sentence"]
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
    return pd.DataFrame(rows, columns=columns)


def headroom_markdown(table: pd.DataFrame) -> str:
    """The headroom sentences under the accuracy table (one per pair and teacher)."""
    if table.empty:
        return "Headroom: no finished teacher found, so the headroom over the CE student is unknown.\n"
    lines = [f"- {r['dataset']}, {r['sentence']}" for _, r in table.iterrows()]
    return "Headroom (teacher minus CE student, best-epoch accuracy):\n\n" + "\n".join(lines) + "\n"


def epochs_to_target(runs: pd.DataFrame, target: float | None = None) -> pd.DataFrame:
    """Epochs (and wall-clock time) each method needs to reach the CE student's best accuracy.

    METHOD 10: curve = max over the method's finished runs of test accuracy at each epoch;
    target R = max of the matched CE student's curve (or the explicit `target`); epoch = first
    epoch (1-based) with curve >= R, missing when never reached; epochs_saved_pct =
    100 * (1 - epoch / total_epochs); time_to_target_s = mean over the runs of elapsed_s at that
    epoch.
    """
    done = _finished(runs)
    curves: dict[tuple, pd.DataFrame] = {}
    info = []
    for key, group in done.groupby(_GROUP, sort=True):
        per_run = [m.set_index("epoch") for m in (read_metrics(Path(p)) for p in group["path"]) if m is not None]
        curves[key] = pd.concat({i: m for i, m in enumerate(per_run)}, names=["run", "epoch"]) if per_run else None
        info.append(dict(zip(_GROUP, key), teacher=group["teacher"].iloc[0], student=group["student"].iloc[0],
                         n_runs=len(group), regime=group["regime"].dropna().iloc[0] if group["regime"].notna().any() else None))
    if not info:
        return pd.DataFrame(columns=_ETT_COLUMNS)
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
    out = pd.DataFrame(rows, columns=_ETT_COLUMNS)
    out["epoch"] = out["epoch"].astype("Int64")  # nullable: "not reached" stays missing
    out["_rank"] = out["method"].map(lambda m: _method_rank(m, OURS))
    return out.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)[_ETT_COLUMNS]


_ETT_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_runs", "best_curve_acc", "target",
    "target_source", "total_epochs", "reached", "epoch", "epochs_saved_pct", "time_to_target_s",
]


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


def unfinished_table(runs: pd.DataFrame, teachers: pd.DataFrame | None = None) -> pd.DataFrame:
    """Runs (and teachers) that are running, failed, interrupted or missing: never averaged,
    listed here with the epochs they finished and, for failed ones, the error."""
    columns = ["dataset", "pair", "method", "variant", "seed", "status", "epochs", "error", "path"]
    parts = [runs.loc[runs["status"] != "finished", columns]]
    if teachers is not None and not teachers.empty:
        t = teachers[teachers["status"] != "finished"]
        parts.append(pd.DataFrame(dict(dataset=t["dataset"], pair=t["teacher_id"], method=TEACHER,
                                       variant=t["variant"], seed=None, status=t["status"],
                                       epochs=t["epochs"], error=t["error"], path=t["path"])))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


# ----------------------------------------------------------------------------- formatting


def _num(value: Any, fmt: str = "{:.2f}", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return missing
    return fmt.format(value)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _pm(mean: float, std: float, sep: str = " ± ") -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f}{sep}{std:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns (pandas.to_markdown would need tabulate)."""
    cells = [[str(h) for h in headers]] + [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]]) + "\n"


def _method_label(row: pd.Series, table: pd.DataFrame) -> str:
    """The method name, with its hash when the pair holds several variants of it."""
    same = table[(table["dataset"] == row["dataset"]) & (table["pair"] == row["pair"]) & (table["method"] == row["method"])]
    return f"{row['method']}-{row['variant']}" if len(same) > 1 else str(row["method"])


def _pair_label(pair: str, arrow: str = " → ") -> str:
    return pair.replace("__", arrow)


def _accuracy_cells(table: pd.DataFrame, sep: str) -> tuple[list[str], list[list[str]]]:
    has_val = table["best_val_mean"].notna().any()
    headers = ["dataset", "pair", "method", "n", "best (%)", "last (%)"]
    headers += ["test@best val (%)"] if has_val else []
    headers += ["gain vs ce", "ARI"]
    rows = []
    for _, r in table.iterrows():
        n = str(r["n_runs"]) + (f" ({r['n_dropped']} dropped)" if r["n_dropped"] else "")
        cells = [r["dataset"], _pair_label(r["pair"]), _method_label(r, table), n,
                 _pm(r["best_mean"], r["best_std"], sep), _pm(r["last_mean"], r["last_std"], sep)]
        cells += [_pm(r["best_val_mean"], r["best_val_std"], sep)] if has_val else []
        gain = _num(r["gain_best"], "{:+.2f}")
        gain += " (headroom)" if r["method"] == TEACHER and gain != "-" else ""
        cells += [gain, _text(r["ari_text"])]
        rows.append(cells)
    return headers, rows


def accuracy_markdown(table: pd.DataFrame) -> str:
    """Mean ± population std over finished runs; gain = best-epoch mean minus the CE student's."""
    headers, rows = _accuracy_cells(table, " ± ")
    return markdown_table(headers, rows)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def accuracy_latex(table: pd.DataFrame, caption: str = "Top-1 test accuracy (\\%), mean $\\pm$ std over runs.") -> str:
    """A booktabs table (needs \\usepackage{booktabs}); one \\midrule between pairs."""
    placeholder = "\x00PM\x00"  # survives escaping, becomes $\pm$ afterwards
    headers, rows = _accuracy_cells(table, placeholder)
    header_tex = {"n": "$n$", "pair": "pair"}
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\begin{tabular}{" + "lll" + "r" * (len(headers) - 4) + "l}",
        "\\toprule",
        " & ".join(header_tex.get(h, latex_escape(h)) for h in headers) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for (_, r), cells in zip(table.iterrows(), rows):
        group = (r["dataset"], r["pair"])
        if previous is not None and group != previous:
            lines.append("\\midrule")
        previous = group
        tex = [latex_escape(c).replace(placeholder, " $\\pm$ ") for c in cells]
        tex[1] = " $\\to$ ".join(latex_escape(part) for part in str(r["pair"]).split("__", 1))
        lines.append(" & ".join(tex) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def epochs_markdown(table: pd.DataFrame) -> str:
    """Epochs to reach the CE student's best accuracy; 'not reached' is text, never a number."""
    headers = ["dataset", "pair", "method", "target (%)", "epoch", "epochs saved", "time to target", "epochs"]
    rows = []
    for _, r in table.iterrows():
        if r["reached"] is None or pd.isna(r["reached"]):
            epoch, saved, time_s = "n/a (" + str(r["target_source"]) + ")", "-", "-"
        elif not r["reached"]:
            epoch, saved, time_s = "not reached", "-", "-"
        else:
            epoch = str(int(r["epoch"]))
            saved = f"{r['epochs_saved_pct']:.0f}%"
            time_s = _num(r["time_to_target_s"], "{:.1f} s")
        rows.append([r["dataset"], _pair_label(r["pair"]), _method_label(r, table),
                     _num(r["target"]), epoch, saved, time_s, str(r["total_epochs"])])
    return markdown_table(headers, rows)


def unfinished_markdown(table: pd.DataFrame) -> str:
    headers = ["dataset", "pair", "method", "variant", "seed", "status", "epochs done", "error"]
    rows = [[r["dataset"], r["pair"], r["method"], r["variant"], _num(r["seed"], "{:.0f}"), r["status"],
             _num(r["epochs"], "{:.0f}"), _text(r["error"])] for _, r in table.iterrows()]
    return markdown_table(headers, rows)


def write_tables(accuracy: pd.DataFrame, epochs: pd.DataFrame, unfinished: pd.DataFrame,
                 out_dir: Path, headroom: pd.DataFrame | None = None) -> dict[str, Path]:
    """accuracy.{csv,md,tex}, epochs_to_target.{csv,md}, unfinished.{csv,md}; returns name -> path.
    With `headroom` (see `headroom_table`): headroom.csv too, and its sentences under accuracy.md's table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "accuracy.md": accuracy_markdown(accuracy) + ("\n" + headroom_markdown(headroom) if headroom is not None else ""),
        "accuracy.tex": accuracy_latex(accuracy),
        "epochs_to_target.md": epochs_markdown(epochs),
        "unfinished.md": unfinished_markdown(unfinished),
    }
    files: dict[str, Path] = {}
    frames = [("accuracy.csv", accuracy), ("epochs_to_target.csv", epochs), ("unfinished.csv", unfinished)]
    frames += [("headroom.csv", headroom)] if headroom is not None else []
    for name, frame in frames:
        files[name] = out_dir / name
        atomic_write(files[name], lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    for name, text in texts.items():
        files[name] = out_dir / name
        atomic_write_text(files[name], text)
    return files


# ----------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def plot_accuracy_curves(runs: pd.DataFrame, out_dir: Path, *, teachers: pd.DataFrame | None = None) -> list[Path]:
    """Per dataset x pair: test accuracy vs epoch per method, mean line and ± std band (ddof=0)
    over the finished runs; a dashed line at the teacher's best accuracy when `teachers` is given.
    Writes curves_<dataset>_<pair>.png; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _finished(runs)
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
        ax.set_title(f"{dataset}: {_pair_label(pair)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"curves_{_safe(dataset)}_{_safe(pair)}.png"
        _save_png(fig, path)
        paths.append(path)
    return paths


_QUALITY_STYLE = {  # colours of the paper's figure (Plotfigs.CPlotTeacherLayerSelection)
    "S": ("separation S", "midnightblue"),
    "I": ("information I", "deepskyblue"),
    "E": ("efficiency E", "red"),
    "Q": ("knowledge quality Q", "dimgrey"),
}


def plot_quality(quality: pd.DataFrame, selected: Sequence[int], path: Path, title: str = "Knowledge quality") -> Path:
    """S, I, E and Q against the generalized-layer index on shared axes (the paper's figure,
    METHOD 7.1), the selected teacher layers marked with crosses on the Q curve."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = quality["layer"].to_numpy() if "layer" in quality else np.arange(len(quality))
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for column, (label, colour) in _QUALITY_STYLE.items():
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return path


def _save_png(fig: Figure, path: Path) -> None:
    """A plot, written atomically like every other artifact (a killed run leaves no half PNG)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def find_profiles(artifacts: Path, *, datasets: Iterable[str] | None = None) -> list[Path]:
    """Every '<dataset>/<teacher>-<hash8>/profile-<hash8>' directory holding a quality.csv."""
    want = set(datasets) if datasets is not None else None
    found = (p.parent for p in Path(artifacts).glob("*/*/profile-*/quality.csv"))
    return sorted(p for p in found if want is None or p.parent.parent.name in want)


def plot_all_profiles(artifacts: Path, out_dir: Path, *, datasets: Iterable[str] | None = None) -> list[Path]:
    """plot_quality for every profile; selected layers from selection.yaml (else the csv's
    `selected` column). Writes quality_<dataset>_<teacher_id>_<profile>.png."""
    out_dir = Path(out_dir)
    paths = []
    for profile in find_profiles(artifacts, datasets=datasets):
        quality = pd.read_csv(profile / "quality.csv")
        selection = _read_config(profile / "selection.yaml")
        selected = selection.get("layers")
        if selected is None and "selected" in quality:
            flags = quality["selected"].astype(str).str.lower().isin(["true", "1"])
            selected = quality.loc[flags, "layer"].tolist()
        dataset, teacher_id = profile.parent.parent.name, profile.parent.name
        title = f"{teacher_id} on {dataset}"
        if selection.get("criterion") is not None:
            title += f" (top-{selection.get('k')} by {selection['criterion']})"
        name = f"quality_{_safe(dataset)}_{_safe(teacher_id)}_{_safe(profile.name)}.png"
        paths.append(plot_quality(quality, [int(i) for i in selected or []], out_dir / name, title=title))
    return paths


# ----------------------------------------------------------------------------- entry point


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
    files = write_tables(accuracy, ett, unfinished, out_dir, headroom=headroom)
    plots = plot_accuracy_curves(runs, out_dir / "plots", teachers=teachers)
    plots += plot_all_profiles(artifacts, out_dir / "plots", datasets=datasets)
    markdown = {"accuracy": accuracy_markdown(accuracy), "headroom": headroom_markdown(headroom),
                "epochs_to_target": epochs_markdown(ett), "unfinished": unfinished_markdown(unfinished)}
    from common.export import write_export_tables  # torch-free like this module; imports this module at its top

    export_md, export_files = write_export_tables(runs, out_dir, accuracy)
    files.update(export_files)
    if export_md:
        markdown["export"] = export_md
    return dict(runs=runs, teachers=teachers, accuracy=accuracy, headroom=headroom, epochs_to_target=ett,
                unfinished=unfinished, markdown=markdown, files=files, plots=plots)
