"""Stage 3's tables as text: Markdown and LaTeX of the frames `common.report.tables` builds, the
headroom sentences, the lines that read the user's numbers against the published ones, and the
writer of accuracy.{csv,md,tex}, headroom.csv, epochs_to_target.{csv,md} and unfinished.{csv,md}.

The cell helpers (`number_cell`, `text_cell`, `pm_cell`, `method_label`, `pair_label`) and
`markdown_table` are shared with `make export`'s table and the layer study's report, so every
table shows a missing number, a mean ± std and a pair the same way.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from common.artifacts.layout import split_pair
from common.files import atomic_write, atomic_write_text
from common.report.published import (
    BENCHMARK_CONFIG, RECIPE_CHECKED, Published, best_published_method, differs_from_published, numbered_sources, published_method,
)
from common.report.stats import (
    ARI_CUTOFF, ARI_MAX, BASELINE, HEADROOM_MIN_POINTS, HEADROOM_STD_FACTOR, OURS, TEACHER, headroom_floor, headroom_too_small,
)

# ----------------------------------------------------------------------------- cells


def number_cell(value: Any, fmt: str = "{:.2f}", missing: str = "-") -> str:
    """`value` formatted with `fmt`; `missing` for None, NaN and pd.NA."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return missing
    return fmt.format(value)


def text_cell(value: Any) -> str:
    """`value` as text; empty for None and NaN."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def pm_cell(mean: float, std: float, sep: str = " ± ", n: int | None = None) -> str:
    """'mean ± std' with two decimals; the mean alone for one run (`n == 1`, whose std of 0 says
    nothing) or a NaN std, '-' without a mean."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) or n == 1 else f"{mean:.2f}{sep}{std:.2f}"


def method_label(row: pd.Series, table: pd.DataFrame) -> str:
    """The method name, with its hash when the pair holds several variants of it."""
    same = table[(table["dataset"] == row["dataset"]) & (table["pair"] == row["pair"]) & (table["method"] == row["method"])]
    return f"{row['method']}-{row['variant']}" if len(same) > 1 else str(row["method"])


def pair_label(pair: str, arrow: str = " → ") -> str:
    """'<teacher>__<student>' as 'teacher → student' (any other name as it is)."""
    names = split_pair(pair)
    return arrow.join(names) if names is not None else pair


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns (pandas.to_markdown would need tabulate)."""
    cells = [[str(h) for h in headers]] + [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]]) + "\n"


# ----------------------------------------------------------------------------- accuracy


def _has_published_column(table: pd.DataFrame) -> bool:
    return "published" in table and bool(table["published"].notna().any())


def _published_numbers(table: pd.DataFrame, with_comparisons: bool = True) -> dict[str, int]:
    """The sources cited under the table -> footnote number: those of the published column's
    cells first, then (`with_comparisons`) those of the best published methods that
    `published_comparison_markdown` names, since a number the user ran no method for still needs
    its citation; the column's numbers are the same either way. Empty when nothing is cited (then
    the footnote is not shown)."""
    if "published" not in table:
        return {}
    cited = list(table.loc[table["published"].notna(), "published_source"])
    cited += [found.source for _, (_, found) in _best_published_for_ours(table)] if with_comparisons else []
    return numbered_sources(cited)


def _accuracy_cells(table: pd.DataFrame, sep: str) -> tuple[list[str], list[list[str]]]:
    has_val = table["best_val_mean"].notna().any()
    has_published = _has_published_column(table)
    sources = _published_numbers(table)
    headers = ["dataset", "pair", "method", "n", "best (%)"]
    headers += ["published (%)"] if has_published else []
    headers += ["last (%)"]
    headers += ["test@best val (%)"] if has_val else []
    headers += ["gain vs ce", "ARI"]
    rows = []
    for _, r in table.iterrows():
        n = str(r["n_runs"]) + (f" ({r['n_dropped']} dropped)" if r["n_dropped"] else "")
        cells = [r["dataset"], pair_label(r["pair"]), method_label(r, table), n, pm_cell(r["best_mean"], r["best_std"], sep, r["n_runs"])]
        if has_published:
            cells += ["-" if pd.isna(r["published"]) else f"{r['published']:.2f} [{sources[r['published_source']]}]"]
        cells += [pm_cell(r["last_mean"], r["last_std"], sep, r["n_runs"])]
        cells += [pm_cell(r["best_val_mean"], r["best_val_std"], sep, r["n_runs"])] if has_val else []
        gain = number_cell(r["gain_best"], "{:+.2f}")
        gain += " (headroom)" if r["method"] == TEACHER and gain != "-" else ""
        cells += [gain, text_cell(r["ari_text"])]
        rows.append(cells)
    return headers, rows


def published_footnote(table: pd.DataFrame, with_comparisons: bool = True) -> str:
    """The line under the accuracy table that names each source of the published numbers once,
    by the number its cells (and, `with_comparisons`, the comparison lines) carry; '' when none
    is shown."""
    sources = _published_numbers(table, with_comparisons)
    if not sources:
        return ""
    cited = "; ".join(f"[{n}] {source}" for source, n in sources.items())
    return (f"published: CIFAR-100 top-1 as reported by {cited}. Other recipes and seeds than yours: "
            "compare the gap, not the decimals.")


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _best_published_for_ours(table: pd.DataFrame) -> list[tuple[pd.Series, tuple[str, Published]]]:
    """Each `ours` row with a best-epoch mean, beside the best published method of its pair
    (`best_published_method`); rows off the benchmark are left out."""
    if "published" not in table:
        return []
    found = []
    for _, r in table[(table["method"] == OURS) & table["best_mean"].notna()].iterrows():
        best = best_published_method(r["dataset"], r["teacher"], r["student"])
        if best is not None:
            found.append((r, best))
    return found


def published_comparison_markdown(table: pd.DataFrame) -> str:
    """The lines under the accuracy table that read the user's numbers against the published ones,
    per pair of the benchmark: where `ours` stands against the best published method (its mean ±
    std over seeds, the published number, the gap in points), and one sentence for each `ce` or
    `kd` whose mean is more than `RECIPE_GAP_POINTS` from the published number, a sign that the
    recipe or the data differ from the benchmark's. '' when there is nothing to say: no pair of
    the benchmark, or neither an `ours` run nor a gap."""
    sources = _published_numbers(table)
    ours = _best_published_for_ours(table)
    lines = []
    for (dataset, pair), group in table.groupby(["dataset", "pair"], sort=False):
        where = pair_label(pair)
        for r, (name, found) in ours:
            if (r["dataset"], r["pair"]) != (dataset, pair):
                continue
            n = int(r["n_runs"])
            lines.append(f"{where}: {method_label(r, table)} {pm_cell(r['best_mean'], r['best_std'], n=n)} ({_seeds(n)}) vs {name} "
                         f"{found.top1:.2f} [{sources[found.source]}] (published, no std given), "
                         f"{r['best_mean'] - found.top1:+.2f} points.")
        checked = group[group["method"].isin(RECIPE_CHECKED) & group["published"].notna() & group["best_mean"].notna()]
        for _, r in checked.iterrows():
            if not differs_from_published(r["best_mean"], r["published"]):
                continue
            gap = r["best_mean"] - r["published"]
            lines.append(f"{where}: your {method_label(r, table)} ({r['best_mean']:.2f} % over {_seeds(int(r['n_runs']))}) is "
                         f"{abs(gap):.2f} points {'below' if gap < 0 else 'above'} the published {published_method(r['method'])} "
                         f"({r['published']:.2f} % [{sources[r['published_source']]}]): a sign that the recipe or the data differ "
                         f"from the benchmark's ({BENCHMARK_CONFIG} has its recipe).")
    if not lines:
        return ""
    return "Against the published numbers (best-epoch top-1):\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"


def accuracy_markdown(table: pd.DataFrame) -> str:
    """Mean ± population std over finished runs; gain = best-epoch mean minus the CE student's;
    a line under the table says what the ARI column means when it holds a value, one names the
    sources of the published numbers when any is shown, and `published_comparison_markdown`
    reads the user's numbers against them."""
    headers, rows = _accuracy_cells(table, " ± ")
    text = markdown_table(headers, rows)
    footnote = published_footnote(table)
    if footnote:
        text += f"\n{footnote}\n"
    comparison = published_comparison_markdown(table)
    if comparison:
        text += f"\n{comparison}"
    if table["ari"].notna().any():
        text += (f"\nARI (average relative improvement): the gain of {OURS} over the CE student divided by each competitor's "
                 f"gain, averaged over the competitors that gained at least {ARI_CUTOFF:g} points; 200% means twice their "
                 f"gain, and values outside 0-{ARI_MAX * 100:.0f}% print as 'unstable'. With small competitor gains it is noisy: "
                 "read the gains themselves first.\n")
    return text


def feats_sentence(chosen: list[str], outputs: list[int] | None) -> str:
    """A sentence when layers Q chose (runs' '4 8 14 15' texts) are not stage outputs, the only
    features mdistiller's and RepDistiller's `feats` give; "" otherwise."""
    if not outputs:
        return ""
    outside = sorted({int(i) for c in chosen for i in c.split()} - set(outputs))
    if not outside:
        return ""
    many = len(outside) != 1
    return (f" mdistiller's and RepDistiller's `feats` hold only the teacher's stem and stage outputs (layers {', '.join(map(str, outputs))}),"
            f" so layer{'s' if many else ''} {', '.join(map(str, outside))} {'are' if many else 'is'} out of their reach;"
            f" torchdistill's forward hooks reach {'them' if many else 'it'} (stage 1's torchdistill_<student>.yaml).")


def opening_sentences(table: pd.DataFrame, runs: pd.DataFrame, stage_outputs: dict[tuple[str, str], list[int]] | None = None) -> str:
    """Two or three plain sentences per pair, from the numbers of the accuracy table: which
    student method won and by how much over the CE student, the teacher's headroom, and the
    teacher layers the `ours` runs distilled from (as their config.yaml records them); with
    `stage_outputs` (`discovery.stage_outputs`), whether mdistiller's and RepDistiller's `feats`
    can reach those layers."""
    paragraphs = []
    for (dataset, pair), group in table.groupby(["dataset", "pair"], sort=False):
        students = group[(group["method"] != TEACHER) & group["best_mean"].notna()]
        if students.empty:
            continue
        best = students.loc[students["best_mean"].idxmax()]
        seeds = f"{int(best['n_runs'])} seed{'s' if best['n_runs'] != 1 else ''}"
        text = f"On {dataset}, {pair_label(pair)}: {method_label(best, table)} did best, {best['best_mean']:.2f} % over {seeds}"
        if best["method"] != BASELINE and not math.isnan(best["gain_best"]):
            text += f", {best['gain_best']:+.2f} points over the CE student"
        ours = students[students["method"] == OURS]
        if best["method"] != OURS and not ours.empty and not math.isnan(ours["gain_best"].iloc[0]):
            text += f"; {OURS} reached {ours['best_mean'].iloc[0]:.2f} % ({ours['gain_best'].iloc[0]:+.2f})"
        text += "."
        teacher = group[group["method"] == TEACHER]
        ce = students[students["method"] == BASELINE]
        if not teacher.empty and not ce.empty:
            headroom = teacher["best_mean"].iloc[0] - ce["best_mean"].iloc[0]
            text += f" The teacher reached {teacher['best_mean'].iloc[0]:.2f} %, a headroom of {headroom:+.2f} points over the CE student."
        layers = runs[(runs["dataset"] == dataset) & (runs["pair"] == pair) & (runs["method"] == OURS)]["teacher_layers"].dropna()
        if not layers.empty:
            chosen = sorted(set(layers))
            text += f" Q chose teacher layer{'s' if len(chosen[0].split()) != 1 else ''} {'; '.join(c.replace(' ', ', ') for c in chosen)}."
            text += feats_sentence(chosen, (stage_outputs or {}).get((dataset, pair)))
        paragraphs.append(text)
    return "\n\n".join(paragraphs) + ("\n\n" if paragraphs else "")


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
        tex[1] = " $\\to$ ".join(latex_escape(part) for part in (split_pair(str(r["pair"])) or (str(r["pair"]),)))
        lines.append(" & ".join(tex) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    footnote = published_footnote(table, with_comparisons=False)  # the comparison lines are Markdown only
    if footnote:
        lines += ["\\par\\smallskip{\\footnotesize " + latex_escape(footnote) + "}"]
    lines += [f"\\caption{{{caption}}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- headroom


def headroom_sentence(pair: str, teacher_acc: float, ce_mean: float, ce_std: float, n_ce: int) -> str:
    """One plain sentence on a pair's headroom (teacher minus CE student, points), with the
    verdict of `headroom_too_small`."""
    where = pair_label(pair)
    if math.isnan(ce_mean):
        return f"{where}: no finished CE student runs, so the headroom is unknown; run `make distill METHOD=ce` with the same settings."
    headroom = teacher_acc - ce_mean
    ce = f"CE student {pm_cell(ce_mean, ce_std, n=n_ce)} % over {n_ce} seed{'s' if n_ce != 1 else ''}"
    text = f"{where}: teacher {teacher_acc:.2f} %, {ce}, headroom {headroom:+.2f} points"
    if n_ce == 1:
        text += " (one CE seed: its seed noise is unknown)"
    if not headroom_too_small(headroom, ce_std):
        return text + "."
    return (f"{text}: **too small for distillation to show anything** (below {headroom_floor(ce_std):.2f} points, the larger of "
            f"{HEADROOM_MIN_POINTS:g} point and {HEADROOM_STD_FACTOR:g}x the CE student's seed std); differences between "
            "methods here are mostly seed noise. Use a stronger teacher, a smaller student or less student training data.")


def headroom_markdown(table: pd.DataFrame) -> str:
    """The headroom sentences under the accuracy table (one per pair and teacher)."""
    if table.empty:
        return "Headroom: no finished teacher found, so the headroom over the CE student is unknown.\n"
    lines = [f"- {r['dataset']}, {r['sentence']}" for _, r in table.iterrows()]
    return "Headroom (teacher minus CE student, best-epoch accuracy):\n\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- epochs to target, unfinished


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
            time_s = number_cell(r["time_to_target_s"], "{:.1f} s")
        rows.append([r["dataset"], pair_label(r["pair"]), method_label(r, table),
                     number_cell(r["target"]), epoch, saved, time_s, str(r["total_epochs"])])
    return markdown_table(headers, rows)


def unfinished_markdown(table: pd.DataFrame) -> str:
    headers = ["dataset", "pair", "method", "variant", "seed", "status", "epochs done", "error"]
    rows = [[r["dataset"], r["pair"], r["method"], r["variant"], number_cell(r["seed"], "{:.0f}"), r["status"],
             number_cell(r["epochs"], "{:.0f}"), text_cell(r["error"])] for _, r in table.iterrows()]
    return markdown_table(headers, rows)


def replaced_images_markdown(runs: pd.DataFrame, teachers: pd.DataFrame) -> str:
    """The runs and teachers that read a streamed split with undecodable files replaced
    (dataset.bad_images=skip), with how many files of each split: their test (or validation)
    set was not the dataset's exactly. '' when there is none."""
    columns = ["skipped_train", "skipped_val", "skipped_test"]
    rows = []
    for kind, frame in (("teacher", teachers), ("student", runs)):
        if frame.empty or not set(columns) <= set(frame.columns):
            continue
        for _, r in frame[frame[columns].fillna(0).sum(axis=1) > 0].iterrows():
            who = r["teacher_id"] if kind == "teacher" else f"{r['pair']} {r['method']}-{r['variant']} seed {int(r['seed'])}"
            rows.append([r["dataset"], kind, text_cell(who), *(number_cell(r[c], "{:.0f}") for c in columns)])
    if not rows:
        return ""
    note = ("Undecodable image files replaced by the next image of their class (dataset.bad_images=skip), "
            "per split: a run's test or validation accuracy is then over a slightly different set.\n\n")
    return note + markdown_table(["dataset", "run", "which", "train files", "val files", "test files"], rows)


# ----------------------------------------------------------------------------- files


def write_tables(accuracy: pd.DataFrame, epochs: pd.DataFrame, unfinished: pd.DataFrame,
                 out_dir: Path, headroom: pd.DataFrame | None = None, opening: str = "") -> dict[str, Path]:
    """accuracy.{csv,md,tex}, epochs_to_target.{csv,md}, unfinished.{csv,md}; returns name -> path.
    With `headroom` (see `common.report.tables.headroom_table`): headroom.csv too, and its sentences
    under accuracy.md's table; `opening` (see `opening_sentences`) above it. unfinished.md only
    when a run is unfinished or failed (an old one is removed): an empty table says nothing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "accuracy.md": opening + accuracy_markdown(accuracy) + ("\n" + headroom_markdown(headroom) if headroom is not None else ""),
        "accuracy.tex": accuracy_latex(accuracy),
        "epochs_to_target.md": epochs_markdown(epochs),
    }
    if unfinished.empty:
        (out_dir / "unfinished.md").unlink(missing_ok=True)
    else:
        texts["unfinished.md"] = unfinished_markdown(unfinished)
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
