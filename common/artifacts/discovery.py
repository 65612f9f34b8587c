"""Run discovery: which student runs and teachers exist under an artifacts directory, their
status, and the per-run numbers of METHOD section 0 item 8.

Stage 3 (`common.report.runner`), `make export` (`common.export.runner`) and the layer study
(`common.study.runner`) all find runs here, through the layout's one home, `common.artifacts.layout`
(`iter_variants`, `iter_teachers`): this module never parses a directory name itself.

Status of a run or teacher directory (`run_status`): `finished` (a `done` file), `running` (a
live process holds its lock), `failed` (a `failed` file: the run crashed, its error is shown),
`interrupted` (killed: rerunning the command resumes it); `find_runs` adds `missing` for a
configured seed with no directory.

Also the one reading of a user's pair (`pair_dir_name`): `teacher__student`,
`teacher->student` or `teacher:student`, for model names that may hold ':' themselves
(`tv:resnet18`, `timm:convnext_atto`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml

from common.artifacts import layout as artifacts
from common.artifacts.layout import PAIR_SEP, VariantDir, iter_teachers, iter_variants, model_name_of, pair_name
from common.errors import ConfigError
from common.files import lock_held

RUN_COLUMNS = [
    "dataset", "teacher", "student", "pair", "method", "variant", "seed", "status", "error",
    "teacher_id", "best_test_acc", "best_epoch", "last_test_acc", "test_at_best_val", "epochs",
    "total_time_s", "regime", "teacher_layers", "path", "skipped_train", "skipped_val", "skipped_test",
]
TEACHER_COLUMNS = [
    "dataset", "teacher", "teacher_id", "variant", "status", "error", "path", "best_test_acc",
    "best_epoch", "last_test_acc", "test_at_best_val", "epochs", "total_time_s", "skipped_train", "skipped_val", "skipped_test",
]
# metrics.csv's counts of undecodable files replaced per split and epoch (dataset.bad_images=skip)
SKIPPED_SPLITS = ("train", "val", "test")

# Settings of a run that do not define its training regime; ignored when matching a method to
# its CE baseline. `lr` is ignored on purpose: the reference gives KD students another peak LR
# than their CE baseline (METHOD 8.7), so the LR must not pull the match elsewhere.
_REGIME_IGNORED = {
    "dataset": {"root", "download"},
    "train": {"seed", "lr", "device", "progress", "eval_batch_size", "teacher_source", "input_path", "compile"},
}

# The library prefixes of model names (`common.models.external.LIBRARIES`; not imported from
# there, since that module needs torch and discovery does not).
MODEL_PREFIXES = ("tv", "timm")
ARROW = "->"
PAIRS_HELP = ("only these teacher->student pairs: teacher__student, or teacher:student where that reads one way "
              "(e.g. resnet34:resnet9, tv:resnet18__timm:convnext_atto)")


# ----------------------------------------------------------------------------- the user's pair


def pair_dir_name(text: str) -> str:
    """A pair as the user writes it -> its name '<teacher>__<student>' (model names with ':', as
    `VariantDir.pair` gives them; the directory writes ':' as '--', `layout.dir_name`).

    'teacher__student' (the directory name itself) and 'teacher->student' are always read;
    'teacher:student' only when exactly one ':' is left after the library prefixes of model
    names ('tv:' / 'timm:' starting either name), so 'tv:resnet18:timm:convnext_atto' reads as
    tv:resnet18 -> timm:convnext_atto. Anything else is a ConfigError naming the fix.
    """
    text = model_name_of(text.strip())  # the directory's own spelling, tv--resnet18, reads too
    for sep in (PAIR_SEP, ARROW):
        if sep in text:
            teacher, _, student = text.partition(sep)
            if teacher and student and not any(s in name for s in (PAIR_SEP, ARROW) for name in (teacher, student)):
                return pair_name(teacher, student)
            raise ConfigError(f"pair {text!r}: write it as teacher{sep}student with one {sep!r}, e.g. resnet34{sep}resnet9")
    names = _colon_names(text)
    if names is None:
        raise ConfigError(
            f"pair {text!r} is not teacher:student (model names may start with tv: or timm:, so ':' alone cannot tell "
            f"them apart here); write it as teacher{PAIR_SEP}student, e.g. resnet34__resnet9 or "
            f"tv:resnet18__timm:convnext_atto"
        )
    return pair_name(*names)


def _colon_names(text: str) -> tuple[str, str] | None:
    """'a:b' -> (a, b). A ':' right after 'tv' or 'timm' belongs to a model name; exactly one
    other ':' must be left, and each side must be a name ('x', or 'tv:x' / 'timm:x')."""
    parts = text.split(":")
    splits = [i for i in range(1, len(parts)) if parts[i - 1] not in MODEL_PREFIXES]
    if len(splits) != 1:
        return None
    teacher, student = ":".join(parts[: splits[0]]), ":".join(parts[splits[0]:])
    return (teacher, student) if _is_model_name(teacher) and _is_model_name(student) else None


def _is_model_name(name: str) -> bool:
    prefix, sep, arch = name.partition(":")
    return bool(arch and ":" not in arch and prefix in MODEL_PREFIXES) if sep else bool(name)


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
                    epochs=0, total_time_s=nan, **skipped_counts(metrics))
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
        **skipped_counts(metrics),
    )


def skipped_counts(metrics: pd.DataFrame | None) -> dict[str, int]:
    """skipped_<split>: the most undecodable files replaced in one epoch of that split (a split is
    read whole each epoch, so this is how many of its files were replaced); 0 without the column."""
    out = {}
    for split in SKIPPED_SPLITS:
        column = f"skipped_{split}"
        values = metrics[column] if metrics is not None and column in metrics else None
        out[column] = int(values.max()) if values is not None and values.notna().any() else 0
    return out


def run_status(run_dir: Path) -> tuple[str, str]:
    """(status, error) of a run or teacher directory.

    finished: a `done` file (written last); running: its `.lock` is held by a live process
    (stage 2 holds it while it trains the run, stage 1 while it trains the teacher); failed: a
    `failed` file, whose first line is the error; interrupted: none of these, so the process
    died (SIGKILL, a crash of the machine) and rerunning the command resumes it.
    """
    if (run_dir / artifacts.DONE).is_file():
        return "finished", ""
    if lock_held(run_dir / ".lock"):
        return "running", ""
    failed = run_dir / artifacts.FAILED
    if failed.is_file():
        return "failed", _error_line(failed.read_text(errors="replace"))
    return "interrupted", ""


def _error_line(text: str) -> str:
    """The error of a `failed` file: its first line, or the last line of a bare traceback."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(empty failed file)"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def read_yaml_dict(path: Path) -> dict[str, Any]:
    """A YAML mapping (a run's config.yaml, a profile's selection.yaml); {} when missing or
    unreadable, so a broken file never hides its run from the report."""
    try:
        data = yaml.safe_load(Path(path).read_text())
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


# ----------------------------------------------------------------------------- all runs


def find_runs(
    artifacts: Path,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per student run directory (and per configured seed with no directory: 'missing').

    `pairs` take anything `pair_dir_name` reads ('teacher__student', 'teacher->student',
    'teacher:student'); `methods` take a method name or 'method-hash8' for one variant.
    Columns: `RUN_COLUMNS`; `regime` is a JSON string of `regime(config)`, `error` the failure
    line of failed runs.
    """
    want_ds = set(datasets) if datasets is not None else None
    want_pairs = {pair_dir_name(p) for p in pairs} if pairs is not None else None
    want_methods = set(methods) if methods is not None else None
    rows: list[dict[str, Any]] = []
    for variant in iter_variants(artifacts):
        if want_ds is not None and variant.dataset not in want_ds:
            continue
        if want_pairs is not None and variant.pair not in want_pairs:
            continue
        if want_methods is not None and not ({variant.method, f"{variant.method}-{variant.run_hash}"} & want_methods):
            continue
        rows.extend(_variant_rows(variant))
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return runs.sort_values(["dataset", "pair", "method", "variant", "seed"], ignore_index=True)


def _variant_rows(variant: VariantDir) -> list[dict[str, Any]]:
    base = dict(dataset=variant.dataset, teacher=variant.teacher, student=variant.student, pair=variant.pair,
                method=variant.method, variant=variant.run_hash)
    rows = []
    configured: set[int] = set()
    for seed, seed_dir in variant.seed_dirs().items():
        config = read_yaml_dict(seed_dir / artifacts.CONFIG)
        configured.update(int(s) for s in config.get("seeds") or [] if isinstance(s, int))
        status, error = run_status(seed_dir)
        metrics = read_metrics(seed_dir)
        if status == "finished" and (metrics is None or "test_acc" not in metrics or "epoch" not in metrics):
            status, error = "failed", "done, but metrics.csv is missing or lacks epoch/test_acc"
        rows.append(dict(
            base, seed=seed, status=status, error=error,
            teacher_id=(config.get("run") or {}).get("teacher_id"),
            regime=json.dumps(regime(config), sort_keys=True, default=str) if config else None,
            teacher_layers=_layers_text((config.get("run") or {}).get("teacher_layers")),
            path=str(seed_dir), **run_summary(metrics),
        ))
    found = {row["seed"] for row in rows}
    for seed in sorted(configured - found):
        rows.append(dict(base, seed=seed, status="missing", error="", teacher_id=None, regime=None, teacher_layers=None,
                         path=str(variant.dir / f"seed{seed}"), **run_summary(None)))
    return rows


def _layers_text(layers: Any) -> str | None:
    """A run's teacher layers as recorded in config.yaml, as '3 7 13 16' (None when absent or empty)."""
    if not isinstance(layers, list) or not layers:
        return None
    return " ".join(str(i) for i in layers)


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of `find_runs` that are averaged: status 'finished' only."""
    return runs[runs["status"] == "finished"]


def find_teachers(artifacts: Path, *, datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per teacher directory '<dataset>/<teacher>-<hash8>' holding a metrics.csv or
    config.yaml (`artifacts.iter_teachers`). Columns: `TEACHER_COLUMNS`."""
    want_ds = set(datasets) if datasets is not None else None
    rows = []
    for t in iter_teachers(artifacts):
        if want_ds is not None and t.dataset not in want_ds:
            continue
        status, error = run_status(t.dir)
        rows.append(dict(dataset=t.dataset, teacher=t.teacher, teacher_id=t.teacher_id, variant=t.run_hash,
                         status=status, error=error, path=str(t.dir), **run_summary(read_metrics(t.dir))))
    return pd.DataFrame(rows, columns=TEACHER_COLUMNS)


def find_profiles(artifacts: Path, *, datasets: Iterable[str] | None = None) -> list[Path]:
    """Every '<dataset>/<teacher>-<hash8>/profile-<hash8>' directory holding a quality.csv.

    A glob, not `common.artifacts.layout`: the layout module has no reader for profile directories yet."""
    want = set(datasets) if datasets is not None else None
    found = (p.parent for p in Path(artifacts).glob("*/*/profile-*/quality.csv"))
    return sorted(p for p in found if want is None or p.parent.parent.name in want)


def stage_outputs(runs: pd.DataFrame) -> dict[tuple[str, str], list[int]]:
    """(dataset, pair) -> the teacher layers that mdistiller's and RepDistiller's `feats` hold: the
    stem (layer 0) and the output of each stage, which are the baseline layers stage 1's
    selection.yaml records (the last block of each stage). The report says when Q's selection
    lies outside them. Read from a profile of the teacher that the pair's runs name
    (run.teacher_id); pairs without one are left out."""
    out: dict[tuple[str, str], list[int]] = {}
    for row in runs.dropna(subset=["teacher_id"]).itertuples():
        key = (row.dataset, row.pair)
        if key in out:
            continue
        dataset_dir = Path(row.path).parents[2]  # seed<k> / <method>-<hash> / <pair> / <dataset>
        teacher_dir = artifacts.existing_dir(dataset_dir, str(row.teacher_id))
        for selection in sorted(teacher_dir.glob("profile-*/selection.yaml")):
            layers = read_yaml_dict(selection).get("baseline_layers")
            if isinstance(layers, list) and layers:
                out[key] = sorted({0, *(int(i) for i in layers)})
                break
    return out

