"""The published CIFAR-100 column of stage 3: the shipped table, the name mapping, the report.

The expected numbers below are typed from the CRD paper's Tables 1-2 and the DKD paper as the
RepDistiller and mdistiller READMEs list them, not read back from the shipped file.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common.artifacts import discovery
from common.report import page, published, tables
from common.report import runner as report
from common.report import text as table_format

STANDARD_PAIRS = {
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
}
NO_DKD = {("resnet110", "resnet20"), ("ResNet50", "vgg8")}  # not in the DKD paper's CIFAR-100 tables
CRD_SOURCE = "RepDistiller README (HobbitLong/RepDistiller@b84f547) = CRD paper (Tian et al. ICLR 2020) Tables 1-2"
DKD_SOURCE = "mdistiller README (megvii-research/mdistiller@a08d46f) = DKD paper (Zhao et al. CVPR 2022)"
STANDARD = "cifar:resnet32x4__cifar:resnet8x4"
# resnet32x4 -> resnet8x4 as the tables print it (our method names)
RESNET32X4_8X4 = {"teacher": 79.42, "ce": 72.50, "kd": 73.33, "sp": 72.94, "crd": 75.51, "dkd": 76.32}


def shipped_rows() -> list[dict[str, str]]:
    lines = published.PUBLISHED_CSV.read_text(encoding="utf-8").splitlines()
    return list(csv.DictReader(line for line in lines if not line.startswith("#")))


def make_run(root: Path, pair: str, method: str, best: float, *, dataset: str = "cifar100", seed: int = 0,
             teacher_id: str = "cifar:resnet32x4-t0000000") -> None:
    """A finished stage-2 run whose best test accuracy is `best`."""
    run_dir = root / dataset / pair / f"{method}-aaaaaaaa" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": dataset}, "train": {"epochs": 2, "seed": seed}, "seeds": [seed],
        "run": {"method": method, "seed": seed, "run_hash": "aaaaaaaa", "teacher_id": teacher_id},
    }))
    pd.DataFrame({"epoch": [1, 2], "test_acc": [best - 5, best], "elapsed_s": [10.0, 20.0]}).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "done").write_text("ok\n")


def make_teacher(root: Path, best: float, *, dataset: str = "cifar100", teacher_id: str = "cifar:resnet32x4-t0000000") -> None:
    t_dir = root / dataset / teacher_id
    t_dir.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "test_acc": [best - 3, best], "elapsed_s": [5.0, 10.0]}).to_csv(t_dir / "metrics.csv", index=False)
    (t_dir / "done").write_text("ok\n")


def accuracy(root: Path) -> pd.DataFrame:
    return tables.accuracy_table(discovery.find_runs(root), teachers=discovery.find_teachers(root))


def by_method(table: pd.DataFrame, pair: str = STANDARD) -> dict[str, pd.Series]:
    rows = table[table["pair"] == pair]
    assert rows["method"].is_unique
    return {r["method"]: r for _, r in rows.iterrows()}


# ----------------------------------------------------------------------------- the shipped table


def test_shipped_table_has_the_13_pairs_the_methods_and_their_sources() -> None:
    rows = shipped_rows()
    assert {(r["teacher"], r["student"]) for r in rows} == STANDARD_PAIRS
    assert {r["method"] for r in rows} == {"teacher", "student", "KD", "SP", "CRD", "DKD"}
    keys = [(r["teacher"], r["student"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)) == 13 * 5 + 11
    for teacher, student in STANDARD_PAIRS:
        methods = {m for t, s, m in keys if (t, s) == (teacher, student)}
        assert methods == {"teacher", "student", "KD", "SP", "CRD"} | (set() if (teacher, student) in NO_DKD else {"DKD"})
    for r in rows:
        assert r["source"] == (DKD_SOURCE if r["method"] == "DKD" else CRD_SOURCE), r
        assert 50.0 < float(r["top1"]) < 85.0, r
    # one model, one accuracy: a teacher (or a student trained alone) has the same number in every pair
    for role, method in (("teacher", "teacher"), ("student", "student")):
        seen: dict[str, set[str]] = {}
        for r in rows:
            if r["method"] == method:
                seen.setdefault(r[role], set()).add(r["top1"])
        assert all(len(v) == 1 for v in seen.values()), seen


def test_shipped_table_stands_on_its_own_and_says_where_it_comes_from() -> None:
    text = published.PUBLISHED_CSV.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for fact in ("CRD", "Tables 1-2", "RepDistiller", "DKD", "mdistiller", "ICLR 2020", "CVPR 2022"):
        assert fact in header, fact
    for path in (published.PUBLISHED_CSV, Path(published.__file__)):
        assert "../shared" not in path.read_text(encoding="utf-8"), path
    assert published.PUBLISHED_CSV.parent == Path(tables.__file__).parent  # package data beside the code


def test_lookup_maps_our_names_and_refuses_the_others() -> None:
    for method, top1 in RESNET32X4_8X4.items():
        found = published.published_top1("cifar100", "cifar:resnet32x4", "cifar:resnet8x4", method)
        assert found is not None and found.top1 == top1, method
    assert published.published_top1("cifar100", "cifar:vgg13", "cifar:MobileNetV2", "kd") == (67.37, CRD_SOURCE)
    assert published.published_top1("cifar100", "cifar:wrn_40_2", "cifar:ShuffleV1", "dkd") == (76.70, DKD_SOURCE)
    for method in ("fitnet", "fitnet_nokd", "fitnet_fc", "sp_ref", "kd_std", "semckd", "simkd", "ours", "ours+ce"):
        assert published.published_top1("cifar100", "cifar:resnet32x4", "cifar:resnet8x4", method) is None, method
    assert published.published_top1("cifar100", "resnet32x4", "resnet8x4", "kd") is None  # not the zoo's models
    assert published.published_top1("cifar10", "cifar:resnet32x4", "cifar:resnet8x4", "kd") is None
    assert published.published_top1("cifar100", "cifar:resnet56", "cifar:resnet8x4", "kd") is None  # not a standard pair
    assert published.published_top1("cifar100", "cifar:resnet110", "cifar:resnet20", "dkd") is None  # DKD has no such row


def test_sources_are_numbered_once_in_order_of_first_use() -> None:
    assert published.numbered_sources(["b", "a", "b", "c", "a"]) == {"b": 1, "a": 2, "c": 3}
    assert published.numbered_sources([]) == {}


# ----------------------------------------------------------------------------- the report


def test_standard_pair_gets_the_published_column_and_footnote(tmp_path: Path) -> None:
    for method, best in (("ce", 70.1), ("kd", 71.0), ("crd", 72.0), ("dkd", 73.0), ("ours", 74.0), ("fitnet", 71.5)):
        make_run(tmp_path, STANDARD, method, best)
    make_teacher(tmp_path, 78.0)
    table = accuracy(tmp_path)
    rows = by_method(table)
    for method in ("teacher", "ce", "kd", "crd", "dkd"):
        assert rows[method]["published"] == RESNET32X4_8X4[method], method
    assert rows["dkd"]["published_source"] == DKD_SOURCE and rows["kd"]["published_source"] == CRD_SOURCE
    for method in ("ours", "fitnet"):
        assert math.isnan(rows[method]["published"]) and rows[method]["published_source"] == "", method
    assert rows["teacher"]["best_mean"] == 78.0 and rows["ce"]["best_mean"] == 70.1  # the user's numbers are untouched

    md = table_format.accuracy_markdown(table)
    header = md.splitlines()[0]
    assert "published (%)" in header and header.index("best (%)") < header.index("published (%)") < header.index("last (%)")
    sources = {CRD_SOURCE: 1, DKD_SOURCE: 2}  # the teacher row (CRD's table) comes first
    for method in ("teacher", "ce", "kd", "crd", "dkd"):
        cell = f"{RESNET32X4_8X4[method]:.2f} [{sources[rows[method]['published_source']]}]"
        assert cell in md, cell
    footnotes = [line for line in md.splitlines() if line.startswith("published:")]
    assert len(footnotes) == 1
    assert footnotes[0].count(CRD_SOURCE) == 1 and footnotes[0].count(DKD_SOURCE) == 1
    assert f"[1] {CRD_SOURCE}" in footnotes[0] and f"[2] {DKD_SOURCE}" in footnotes[0]
    assert "compare the gap, not the decimals" in footnotes[0]
    ours_line = next(line for line in md.splitlines() if "| ours " in line)
    assert "| - " in ours_line  # no published number: a dash in the column

    tex = table_format.accuracy_latex(table)
    assert "published (\\%)" in tex and "76.32 [2]" in tex and "\\footnotesize published:" in tex


def test_report_files_carry_the_columns(tmp_path: Path) -> None:
    arts, out = tmp_path / "artifacts", tmp_path / "reports"
    make_run(arts, STANDARD, "ce", 70.0)
    make_run(arts, STANDARD, "dkd", 73.0)
    result = report.run(arts, out)
    csv_table = pd.read_csv(out / "accuracy.csv")
    assert {"published", "published_source"} <= set(csv_table.columns)
    dkd = csv_table[csv_table["method"] == "dkd"].iloc[0]
    assert dkd["published"] == 76.32 and dkd["published_source"] == DKD_SOURCE
    assert "published (%)" in (out / "accuracy.md").read_text() and "published (%)" in result["markdown"]["accuracy"]
    html = page.render(out)
    assert "published (%)" in html and "76.32 [2]" in html and "compare the gap, not the decimals" in html


def test_only_dkd_rows_number_dkd_first(tmp_path: Path) -> None:
    make_run(tmp_path, STANDARD, "dkd", 73.0)
    md = table_format.accuracy_markdown(accuracy(tmp_path))
    assert "76.32 [1]" in md and f"[1] {DKD_SOURCE}" in md and CRD_SOURCE not in md


def test_other_pairs_datasets_and_models_get_no_column(tmp_path: Path) -> None:
    cases = [
        ("cifar100", "cifar:resnet56__cifar:resnet8x4", "cifar:resnet56-t0000000"),  # not a standard pair
        ("cifar10", STANDARD, "cifar:resnet32x4-t0000000"),  # the standard pair on another dataset
        ("cifar100", "resnet32x4__resnet8x4", "resnet32x4-t0000000"),  # names outside the zoo
        ("fashion_mnist", "resnet34__resnet9", "resnet34-t0000000"),
    ]
    for i, (dataset, pair, teacher_id) in enumerate(cases):
        root = tmp_path / str(i)
        for method, best in (("ce", 60.0), ("kd", 62.0), ("dkd", 63.0)):
            make_run(root, pair, method, best, dataset=dataset, teacher_id=teacher_id)
        make_teacher(root, 70.0, dataset=dataset, teacher_id=teacher_id)
        table = accuracy(root)
        assert len(table) == 4 and table["published"].isna().all() and (table["published_source"] == "").all(), pair
        md, tex = table_format.accuracy_markdown(table), table_format.accuracy_latex(table)
        assert "published" not in md and "published" not in tex, pair


def test_mixed_table_shows_dashes_for_rows_without_a_number(tmp_path: Path) -> None:
    make_run(tmp_path, STANDARD, "kd", 71.0)
    make_run(tmp_path, "cifar:resnet56__cifar:resnet8x4", "kd", 70.0)
    table = accuracy(tmp_path)
    assert np.isnan(by_method(table, "cifar:resnet56__cifar:resnet8x4")["kd"]["published"])
    md = table_format.accuracy_markdown(table)
    other = next(line for line in md.splitlines() if "cifar:resnet56 → cifar:resnet8x4" in line)
    standard = next(line for line in md.splitlines() if "cifar:resnet32x4 → cifar:resnet8x4" in line)
    assert "73.33 [1]" in standard and "73.33" not in other and "| - " in other


def test_empty_accuracy_table_has_the_columns() -> None:
    empty = tables.accuracy_table(pd.DataFrame(columns=discovery.RUN_COLUMNS))
    assert {"published", "published_source"} <= set(empty.columns)


# ----------------------------------------------------------------------------- ours against the best published method, recipe flags

COMPARISON = "Against the published numbers (best-epoch top-1):"
RECIPE = "a sign that the recipe or the data differ from the benchmark's (configs/cifar100_kd_benchmark.yaml has its recipe)."


def comparison_lines(md: str) -> list[str]:
    return [line[2:] for line in md.splitlines() if line.startswith("- ") and "published" in line]


def test_best_published_method_excludes_teacher_and_student_and_takes_the_highest(monkeypatch) -> None:
    best = published.best_published_method
    assert best("cifar100", "cifar:resnet32x4", "cifar:resnet8x4") == ("DKD", (76.32, DKD_SOURCE))  # not the teacher's 79.42
    assert best("cifar100", "cifar:resnet110", "cifar:resnet20") == ("CRD", (71.46, CRD_SOURCE))  # no DKD row
    assert best("cifar100", "cifar:vgg13", "cifar:MobileNetV2") == ("CRD", (69.73, CRD_SOURCE))  # CRD 69.73 > DKD 69.71
    for args in (("cifar10", "cifar:resnet32x4", "cifar:resnet8x4"), ("cifar100", "resnet32x4", "resnet8x4"),
                 ("cifar100", "cifar:resnet56", "cifar:resnet8x4")):
        assert best(*args) is None, args
    # a student trained alone above every method (never so in the tables) still is no method
    fake = {("a", "b", "student"): published.Published(90.0, "s"), ("a", "b", "teacher"): published.Published(95.0, "s"),
            ("a", "b", "KD"): published.Published(70.0, "s"), ("a", "b", "SP"): published.Published(71.0, "s")}
    monkeypatch.setattr(published, "published_table", lambda: fake)
    assert best("cifar100", "cifar:a", "cifar:b") == ("SP", (71.0, "s"))


def test_ours_line_against_the_best_published_method(tmp_path: Path) -> None:
    for seed, best in enumerate((75.7, 75.9, 76.1)):
        make_run(tmp_path, STANDARD, "ours", best, seed=seed)
    make_run(tmp_path, STANDARD, "ce", 72.0)  # within 1 point of 72.50: no flag
    make_teacher(tmp_path, 78.0)
    md = table_format.accuracy_markdown(accuracy(tmp_path))
    # DKD is cited only by the line (no dkd run), so it gets the next footnote number after CRD's
    assert f"[1] {CRD_SOURCE}; [2] {DKD_SOURCE}" in md
    assert COMPARISON in md
    assert comparison_lines(md) == [
        "cifar:resnet32x4 → cifar:resnet8x4: ours 75.90 ± 0.16 (3 seeds) vs DKD 76.32 [2] (published, no std given), -0.42 points."]
    assert md.index("published: CIFAR-100") < md.index(COMPARISON)  # under the table, after the sources
    tex = table_format.accuracy_latex(accuracy(tmp_path))
    assert "76.32" not in tex and DKD_SOURCE not in tex and CRD_SOURCE in tex  # the line is Markdown only


def test_one_ours_seed_has_no_std_and_a_pair_without_dkd_compares_with_crd(tmp_path: Path) -> None:
    pair = "cifar:resnet110__cifar:resnet20"
    make_run(tmp_path, pair, "ours", 72.0, teacher_id="cifar:resnet110-t0000000")
    md = table_format.accuracy_markdown(accuracy(tmp_path))
    assert "published (%)" not in md  # no row has a published number: no column, but the line and its citation
    assert comparison_lines(md) == [
        "cifar:resnet110 → cifar:resnet20: ours 72.00 (1 seed) vs CRD 71.46 [1] (published, no std given), +0.54 points."]
    assert f"[1] {CRD_SOURCE}." in md and DKD_SOURCE not in md


def test_no_line_without_ours(tmp_path: Path) -> None:
    for method, best in (("ce", 72.0), ("kd", 73.0), ("dkd", 76.0), ("fitnet", 74.0), ("ours_ce", 75.0)):
        make_run(tmp_path, STANDARD, method, best)
    make_teacher(tmp_path, 79.0)
    md = table_format.accuracy_markdown(accuracy(tmp_path))
    assert "published (%)" in md and COMPARISON not in md and " vs DKD" not in md and comparison_lines(md) == []


def flag_case(root: Path, method: str, best: float) -> list[str]:
    make_run(root, STANDARD, method, best)
    return comparison_lines(table_format.accuracy_markdown(accuracy(root)))


def test_recipe_flag_fires_beyond_one_point_for_ce_and_kd(tmp_path: Path) -> None:
    assert published.RECIPE_GAP_POINTS == 1.0
    cases = [("ce", 70.1, "your ce (70.10 % over 1 seed) is 2.40 points below the published student (72.50 % [1])"),
             ("ce", 73.51, "your ce (73.51 % over 1 seed) is 1.01 points above the published student (72.50 % [1])"),
             ("kd", 72.32, "your kd (72.32 % over 1 seed) is 1.01 points below the published KD (73.33 % [1])"),
             ("kd", 75.0, "your kd (75.00 % over 1 seed) is 1.67 points above the published KD (73.33 % [1])")]
    for i, (method, best, sentence) in enumerate(cases):
        lines = flag_case(tmp_path / str(i), method, best)
        assert lines == [f"cifar:resnet32x4 → cifar:resnet8x4: {sentence}: {RECIPE}"], (method, best)


def test_recipe_flag_stays_quiet_within_one_point(tmp_path: Path) -> None:
    # exactly 1 point is not more than 1 point, also where binary floats make it 1.000000000000007
    assert 64.01 - 63.01 > 1.0 and not published.differs_from_published(63.01, 64.01)
    assert published.differs_from_published(63.0, 64.01) and published.differs_from_published(65.02, 64.01)
    for i, (method, best) in enumerate([("ce", 71.5), ("ce", 73.5), ("ce", 72.5), ("kd", 72.33), ("kd", 74.33), ("kd", 73.0)]):
        root = tmp_path / str(i)
        lines = flag_case(root, method, best)
        assert lines == [], (method, best)
        assert COMPARISON not in table_format.accuracy_markdown(accuracy(root))


def test_recipe_flag_uses_the_mean_over_seeds_and_not_other_methods(tmp_path: Path) -> None:
    for seed, best in enumerate((70.0, 72.0)):  # mean 71.00: 1.50 below 72.50, though one seed is within 1 point
        make_run(tmp_path, STANDARD, "ce", best, seed=seed)
    for method, best in (("sp", 60.0), ("crd", 60.0), ("dkd", 60.0)):  # far off, but not the recipe's controls
        make_run(tmp_path, STANDARD, method, best)
    make_teacher(tmp_path, 70.0)  # 9.42 below the published teacher: the teacher is not checked either
    lines = comparison_lines(table_format.accuracy_markdown(accuracy(tmp_path)))
    assert lines == [f"cifar:resnet32x4 → cifar:resnet8x4: your ce (71.00 % over 2 seeds) is 1.50 points below the published "
                     f"student (72.50 % [1]): {RECIPE}"]


def test_nothing_for_pairs_off_the_benchmark(tmp_path: Path) -> None:
    cases = [
        ("cifar100", "cifar:resnet56__cifar:resnet8x4", "cifar:resnet56-t0000000"),  # not a standard pair
        ("cifar10", STANDARD, "cifar:resnet32x4-t0000000"),  # the standard pair on another dataset
        ("cifar100", "resnet32x4__resnet8x4", "resnet32x4-t0000000"),  # names outside the zoo
    ]
    for i, (dataset, pair, teacher_id) in enumerate(cases):
        root = tmp_path / str(i)
        for method, best in (("ce", 50.0), ("kd", 51.0), ("ours", 52.0)):  # far from every published number
            make_run(root, pair, method, best, dataset=dataset, teacher_id=teacher_id)
        md = table_format.accuracy_markdown(accuracy(root))
        assert COMPARISON not in md and comparison_lines(md) == [] and "published" not in md, pair


def test_lines_reach_accuracy_md_and_report_html(tmp_path: Path) -> None:
    arts, out = tmp_path / "artifacts", tmp_path / "reports"
    make_run(arts, STANDARD, "ce", 70.1)
    make_run(arts, STANDARD, "ours", 74.0)
    make_run(arts, "cifar:resnet56__cifar:resnet8x4", "ours", 74.0, teacher_id="cifar:resnet56-t0000000")
    result = report.run(arts, out)
    ours_line = "cifar:resnet32x4 → cifar:resnet8x4: ours 74.00 (1 seed) vs DKD 76.32 [2] (published, no std given), -2.32 points."
    for md in ((out / "accuracy.md").read_text(encoding="utf-8"), result["markdown"]["accuracy"]):
        assert md.count(COMPARISON) == 1 and len(comparison_lines(md)) == 2 and f"- {ours_line}" in md
        assert "your ce (70.10 % over 1 seed) is 2.40 points below the published student" in md
    html = page.render(out)
    assert "<li>cifar:resnet32x4 → cifar:resnet8x4: ours 74.00 (1 seed) vs DKD 76.32 [2]" in html
    assert "configs/cifar100_kd_benchmark.yaml has its recipe" in html
