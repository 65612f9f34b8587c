"""Stage 3's export table: parameters, MACs, file sizes and CPU latency of the exported students.

Built from the export.yaml files (`common.export.record`) of the runs stage 3 found; imports
neither torch nor ONNX. One row per run (`export_table`), one per dataset x pair x method variant
(`export_summary`), the Markdown of it (`export_markdown`), and the three files stage 3 writes
(`write_export_tables`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from common.export.record import is_up_to_date, read_record
from common.files import atomic_write, atomic_write_text
from common.report.stats import method_rank
from common.report.text import markdown_table, method_label, number_cell, pair_label

_RUN_TABLE_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "seed", "export", "params", "macs",
    "onnx_bytes", "torchscript_bytes", "ort_b1_ms", "torch_b1_ms", "ort_b64_ms", "torch_b64_ms",
    "onnx_max_diff", "torchscript_max_diff", "threads", "cpu", "path",
]
_SUMMARY_COLUMNS = [
    "dataset", "pair", "teacher", "student", "method", "variant", "n_exported", "n_runs", "params", "macs",
    "onnx_bytes", "torchscript_bytes", "ort_b1_ms", "torch_b1_ms", "ort_b64_ms", "torch_b64_ms",
    "onnx_max_diff", "torchscript_max_diff", "machines",
]
_LATENCY_COLUMNS = {"ort_b1_ms": ("batch1", "onnxruntime"), "torch_b1_ms": ("batch1", "pytorch"),
                    "ort_b64_ms": ("batch64", "onnxruntime"), "torch_b64_ms": ("batch64", "pytorch")}


def export_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run of `runs` (from `common.artifacts.discovery.find_runs`): export is 'exported'
    (export.yaml up to date), 'stale' (student.pt changed since) or 'missing'; the numbers of its
    export.yaml (NaN unless exported), latencies as medians in ms per batch."""
    rows = []
    for _, run in runs[runs["status"] == "finished"].iterrows():
        path = Path(run["path"])
        record = read_record(path)
        state = "missing" if record is None else ("exported" if is_up_to_date(path) else "stale")
        row: dict[str, Any] = {c: run[c] for c in ["dataset", "pair", "teacher", "student", "method", "variant", "seed"]}
        row.update(export=state, path=str(path))
        if state == "exported":
            lat = record["latency"]
            row.update(params=record["params"], macs=record["macs_per_image"], onnx_bytes=record["onnx"]["bytes"],
                       torchscript_bytes=record["torchscript"]["bytes"], onnx_max_diff=record["onnx"]["max_abs_diff"],
                       torchscript_max_diff=record["torchscript"]["max_abs_diff"], threads=lat["threads"], cpu=lat["cpu"])
            for column, (batch, runtime) in _LATENCY_COLUMNS.items():
                row[column] = lat[batch][runtime]["median"]
        rows.append(row)
    return pd.DataFrame(rows, columns=_RUN_TABLE_COLUMNS)


def export_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset x pair x method-variant over its exported runs: params, MACs and file
    sizes of the first (seeds share the architecture), latencies as the median over the runs,
    max diffs as the max over them; n_runs counts the finished runs, exported or not; machines
    lists the 'cpu, N threads' the latencies were measured with."""
    rows = []
    for key, group in table.groupby(["dataset", "pair", "method", "variant"], sort=True):
        done = group[group["export"] == "exported"]
        row: dict[str, Any] = dict(zip(["dataset", "pair", "method", "variant"], key), teacher=group["teacher"].iloc[0],
                                   student=group["student"].iloc[0], n_exported=len(done), n_runs=len(group))
        first = done.iloc[0] if len(done) else None
        for column in ["params", "macs", "onnx_bytes", "torchscript_bytes"]:
            row[column] = first[column] if first is not None else math.nan
        for column in _LATENCY_COLUMNS:
            row[column] = float(done[column].median()) if len(done) else math.nan
        for column in ["onnx_max_diff", "torchscript_max_diff"]:
            row[column] = float(done[column].max()) if len(done) else math.nan
        row["machines"] = "; ".join(sorted({f"{r['cpu']}, {int(r['threads'])} threads" for _, r in done.iterrows()}))
        rows.append(row)
    out = pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)
    out["_rank"] = out["method"].map(lambda m: method_rank(m, "ours"))
    return out.sort_values(["dataset", "pair", "_rank", "method", "variant"], ignore_index=True)[_SUMMARY_COLUMNS]


def export_markdown(summary: pd.DataFrame, accuracy: pd.DataFrame | None = None) -> str:
    """The export table as Markdown; with `accuracy` (stage 3's accuracy table) the best-epoch
    mean accuracy sits next to the costs. A note under it names the machines and the rules."""
    acc: dict[tuple, float] = {}
    if accuracy is not None and not accuracy.empty:
        acc = {(r["dataset"], r["pair"], r["method"], r["variant"]): r["best_mean"] for _, r in accuracy.iterrows()}
    headers = ["dataset", "pair", "method", "n"] + (["best (%)"] if acc else []) + [
        "params (M)", "MMACs", "ONNX (MB)", "ORT b1 (ms)", "PyTorch b1 (ms)", "ORT b64 (ms)", "PyTorch b64 (ms)", "max diff ONNX", "max diff TS"]
    rows = []
    for _, r in summary.iterrows():
        n = str(r["n_exported"]) if r["n_exported"] == r["n_runs"] else f"{r['n_exported']}/{r['n_runs']}"
        cells = [r["dataset"], pair_label(r["pair"]), method_label(r, summary), n]
        if acc:
            cells.append(number_cell(acc.get((r["dataset"], r["pair"], r["method"], r["variant"]))))
        cells += [number_cell(r["params"] / 1e6, "{:.3f}"), number_cell(r["macs"] / 1e6, "{:.1f}"),
                  number_cell(r["onnx_bytes"] / 1e6, "{:.2f}")]
        cells += [number_cell(r[c], "{:.2f}") for c in _LATENCY_COLUMNS]
        cells += [number_cell(r["onnx_max_diff"], "{:.1e}"), number_cell(r["torchscript_max_diff"], "{:.1e}")]
        rows.append(cells)
    machines = sorted({m for ms in summary["machines"].dropna() for m in str(ms).split("; ") if m})
    note = (
        f"\nCPU latency in ms per batch (median over the runs of each run's median of timed calls after warm-up), "
        f"PyTorch eager vs ONNX Runtime with the same threads; measured on: {' | '.join(machines) or 'nothing exported yet'}. "
        f"MACs per image = FLOPs / 2 of FlopCounterMode (convolutions, linear layers, matrix products). "
        f"MB = 10^6 bytes. max diff: largest |logit - PyTorch's logit| on the test images. "
        f"n: exported runs (of finished ones); export the rest with `make export`.\n"
    )
    return markdown_table(headers, rows) + note


def write_export_tables(runs: pd.DataFrame, out_dir: Path, accuracy: pd.DataFrame | None = None) -> tuple[str, dict[str, Path]]:
    """Stage 3's export table: export.csv (per pair and method), export_runs.csv (per run) and
    export.md under `out_dir`. Returns (markdown, {name: path}); ("", {}) when no run of `runs`
    has an export.yaml, so a report without `make export` shows no empty table."""
    table = export_table(runs)
    if not (table["export"] != "missing").any():
        return "", {}
    summary = export_summary(table)
    text = export_markdown(summary, accuracy)
    out_dir = Path(out_dir)
    files = {name: out_dir / name for name in ("export.csv", "export_runs.csv", "export.md")}
    atomic_write(files["export.csv"], lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write(files["export_runs.csv"], lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(files["export.md"], text)
    return text, files
