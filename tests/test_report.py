"""Stage 3 report: tables and plots from hand-made run directories (METHOD 10, section 0 item 8)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from common import plots
from common.artifacts import discovery
from common.report import runner as report
from common.report import stats as report_stats
from common.report import text as table_format
from common.report import tables
from common.errors import ConfigError, DataError

PAIR = "resnet34__resnet9"
TEACHER_ID = "resnet34-t0000000"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, method: str, seed: int, test: list[float], *, variant: str = "aaaaaaaa",
             val: list[float] | None = None, status: str = "finished", dataset: str = "fashion_mnist",
             pair: str = PAIR, train: dict | None = None, seeds: list[int] | None = None,
             epoch_time: float = 10.0) -> Path:
    """A run directory as stage 2 writes it, with the given per-epoch test (and val) accuracies."""
    run_dir = root / dataset / pair / f"{method}-{variant}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    config = {
        "dataset": {"name": dataset, "root": None, "val_size": 0},
        "train": {"epochs": len(test), "lr": 0.01, "seed": seed, "train_subset": None, **(train or {})},
        "seeds": seeds if seeds is not None else [seed],
        "run": {"method": method, "seed": seed, "run_hash": variant, "teacher_id": TEACHER_ID},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    n = len(test)
    metrics = pd.DataFrame({
        "epoch": np.arange(1, n + 1), "train_loss": np.linspace(2, 1, n), "loss_ce": np.linspace(2, 1, n),
        "train_acc": test, "test_acc": test, "lr": 0.01, "epoch_time_s": epoch_time,
        "images_per_s": 100.0, "elapsed_s": epoch_time * np.arange(1, n + 1),
    })
    if val is not None:
        metrics.insert(5, "val_acc", val)
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    if status == "finished":
        (run_dir / "done").write_text("2025-01-01\n")
    elif status == "failed":
        (run_dir / "failed").write_text("Traceback...\nTrainingError: loss is NaN at epoch 2; lower train.lr\n")
    return run_dir


def make_teacher(root: Path, test: list[float], dataset: str = "fashion_mnist") -> Path:
    t_dir = root / dataset / TEACHER_ID
    t_dir.mkdir(parents=True)
    pd.DataFrame({"epoch": np.arange(1, len(test) + 1), "test_acc": test,
                  "elapsed_s": np.arange(1, len(test) + 1) * 5.0}).to_csv(t_dir / "metrics.csv", index=False)
    (t_dir / "config.yaml").write_text(yaml.safe_dump({"teacher": {"name": "resnet34"}}))
    (t_dir / "done").write_text("ok\n")
    return t_dir


def row(table: pd.DataFrame, method: str, **where) -> pd.Series:
    sel = table[table["method"] == method]
    for key, value in where.items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ----------------------------------------------------------------------------- per run


def test_run_summary_best_last_and_test_at_best_val() -> None:
    metrics = pd.DataFrame({"epoch": [1, 2, 3, 4], "test_acc": [50.0, 70.0, 65.0, 60.0],
                            "val_acc": [40.0, 55.0, 72.0, 71.0], "elapsed_s": [1.0, 2.5, 4.0, 6.0]})
    s = discovery.run_summary(metrics)
    assert s["best_test_acc"] == 70.0 and s["best_epoch"] == 2
    assert s["last_test_acc"] == 60.0
    assert s["test_at_best_val"] == 65.0  # epoch 3 has the best val accuracy
    assert s["epochs"] == 4 and s["total_time_s"] == 6.0
    no_val = discovery.run_summary(metrics.drop(columns="val_acc"))
    assert math.isnan(no_val["test_at_best_val"]) and no_val["best_test_acc"] == 70.0


def test_find_runs_statuses_missing_seeds_and_filters(tmp_path: Path) -> None:
    make_run(tmp_path, "ce", 0, [60, 70], seeds=[0, 1, 2])
    make_run(tmp_path, "ce", 1, [61, 71], status="unfinished", seeds=[0, 1, 2])
    make_run(tmp_path, "kd", 0, [62, 72], status="failed")
    make_run(tmp_path, "kd", 0, [60, 70], dataset="cifar10")
    runs = discovery.find_runs(tmp_path)
    fm = runs[runs["dataset"] == "fashion_mnist"]
    status = {(r.method, r.seed): r.status for r in fm.itertuples()}
    assert status == {("ce", 0): "finished", ("ce", 1): "interrupted", ("ce", 2): "missing", ("kd", 0): "failed"}
    failed = row(fm, "kd")
    assert "loss is NaN" in failed["error"]
    first = row(fm, "ce", seed=0)
    assert (first["teacher"], first["student"], first["variant"]) == ("resnet34", "resnet9", "aaaaaaaa")
    assert list(discovery.find_runs(tmp_path, datasets=["cifar10"])["dataset"].unique()) == ["cifar10"]
    assert set(discovery.find_runs(tmp_path, methods=["kd"])["method"]) == {"kd"}
    assert len(discovery.find_runs(tmp_path, pairs=["resnet34->resnet9"])) == len(runs)
    assert discovery.find_runs(tmp_path, pairs=["vgg19__vgg11"]).empty


# ----------------------------------------------------------------------------- accuracy table


def test_accuracy_mean_population_std_gain_and_exclusions(tmp_path: Path) -> None:
    make_run(tmp_path, "ce", 0, [70, 80, 78], val=[60, 65, 70])
    make_run(tmp_path, "ce", 1, [72, 82, 81], val=[60, 70, 65])
    make_run(tmp_path, "ce", 2, [99, 99], status="unfinished")  # never averaged
    make_run(tmp_path, "ce", 3, [99, 99], status="failed")
    make_run(tmp_path, "ours", 0, [75, 84, 85])
    make_teacher(tmp_path, [88.0, 93.5, 93.0])
    runs = discovery.find_runs(tmp_path)
    table = tables.accuracy_table(runs, teachers=discovery.find_teachers(tmp_path))
    ce = row(table, "ce")
    assert ce["n_runs"] == 2
    assert ce["best_mean"] == pytest.approx(81.0) and ce["best_std"] == pytest.approx(1.0)  # ddof=0
    assert ce["last_mean"] == pytest.approx(79.5) and ce["last_std"] == pytest.approx(1.5)
    assert ce["best_val_mean"] == pytest.approx((78 + 82) / 2)  # test acc at the best val epochs
    assert row(table, "ours")["gain_best"] == pytest.approx(85 - 81)
    assert row(table, "ours")["gain_last"] == pytest.approx(85 - 79.5)
    teacher = row(table, "teacher")
    assert teacher["best_mean"] == 93.5 and teacher["gain_best"] == pytest.approx(93.5 - 81)
    assert list(table["method"]) == ["teacher", "ce", "ours"]
    unfinished = tables.unfinished_table(runs)
    assert set(zip(unfinished["seed"], unfinished["status"])) == {(2, "interrupted"), (3, "failed")}


def test_gain_uses_ce_variant_with_matching_train_section(tmp_path: Path) -> None:
    make_run(tmp_path, "ce", 0, [60, 70], variant="cefull00", train={"train_subset": None})
    make_run(tmp_path, "ce", 0, [50, 55], variant="cesub000", train={"train_subset": 1000})
    # ours differs from both in lr (ignored by the rule) and matches the subset variant
    make_run(tmp_path, "ours", 0, [58, 59], variant="ourssub0", train={"train_subset": 1000, "lr": 0.05})
    table = tables.accuracy_table(discovery.find_runs(tmp_path))
    ours = row(table, "ours")
    assert ours["ce_variant"] == "cesub000" and ours["gain_best"] == pytest.approx(59 - 55)
    assert "ce-cefull00" in table_format.accuracy_markdown(table)  # several ce variants: labelled by hash


def ari_table(root: Path, accs: dict[str, float]) -> pd.DataFrame:
    for method, acc in accs.items():
        make_run(root, method, 0, [acc - 5, acc])
    return tables.accuracy_table(discovery.find_runs(root))


def test_ari_qualifying_competitors_only(tmp_path: Path) -> None:
    table = ari_table(tmp_path, {"ce": 80.0, "kd": 82.0, "sp": 84.0, "fitnet": 80.3, "ours": 83.0, "ours_ce": 95.0})
    # kd (2) and sp (4) qualify; fitnet (0.3 < 0.5) and the ablation ours_ce do not
    expected = np.mean([3 / 2, 3 / 4])
    ours = row(table, "ours")
    assert ours["ari"] == pytest.approx(expected)
    assert ours["ari_text"] == f"{expected * 100:.0f}%"
    assert row(table, "kd")["ari_text"] == ""
    assert report_stats.ari(3.0, [2.0], cutoff=0.5) == pytest.approx(1.5)


def test_ari_unstable_and_not_available(tmp_path: Path) -> None:
    assert row(ari_table(tmp_path / "a", {"ce": 80.0, "kd": 82.0, "ours": 79.0}), "ours")["ari_text"] == "unstable"
    assert row(ari_table(tmp_path / "b", {"ce": 80.0, "kd": 80.5, "ours": 88.0}), "ours")["ari_text"] == "unstable"  # 16 >= 15
    assert row(ari_table(tmp_path / "c", {"ce": 80.0, "kd": 80.2, "ours": 83.0}), "ours")["ari_text"] == "n/a"
    assert math.isnan(row(ari_table(tmp_path / "d", {"ce": 80.0, "kd": 80.2, "ours": 83.0}), "ours")["ari"])


def test_drop_outliers_is_opt_in(tmp_path: Path) -> None:
    for seed, acc in enumerate([90.0, 88.9, 89.0]):  # 88.9 is > 1 pt below 90; 89.0 is exactly 1 pt
        make_run(tmp_path, "kd", seed, [acc - 3, acc])
    runs = discovery.find_runs(tmp_path)
    default = row(tables.accuracy_table(runs), "kd")
    assert default["n_runs"] == 3 and default["best_mean"] == pytest.approx((90 + 88.9 + 89) / 3)
    dropped = row(tables.accuracy_table(runs, drop_outliers=True), "kd")
    assert dropped["n_runs"] == 2 and dropped["n_dropped"] == 1
    assert dropped["best_mean"] == pytest.approx(89.5) and dropped["best_std"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- epochs to target


def test_epochs_to_target_reached_not_reached_and_explicit(tmp_path: Path) -> None:
    make_run(tmp_path, "ce", 0, [50, 60, 70, 75], epoch_time=10.0)
    make_run(tmp_path, "ce", 1, [55, 65, 72, 74], epoch_time=10.0)
    make_run(tmp_path, "ours", 0, [60, 70, 74, 80], epoch_time=10.0)
    make_run(tmp_path, "ours", 1, [62, 76, 77, 78], epoch_time=20.0)
    make_run(tmp_path, "kd", 0, [50, 60, 70, 74.9])
    runs = discovery.find_runs(tmp_path)
    ett = tables.epochs_to_target(runs)
    ours = row(ett, "ours")
    # curve = max over runs per epoch = [62, 76, 77, 80]; target = max ce curve = 75
    assert ours["target"] == 75.0 and ours["epoch"] == 2
    assert ours["epochs_saved_pct"] == pytest.approx(50.0)
    assert ours["time_to_target_s"] == pytest.approx((20.0 + 40.0) / 2)  # mean elapsed at epoch 2
    assert row(ett, "ce")["epoch"] == 4
    kd = row(ett, "kd")
    assert not kd["reached"] and pd.isna(kd["epoch"]) and math.isnan(kd["epochs_saved_pct"])
    md = table_format.epochs_markdown(ett)
    kd_line = next(line for line in md.splitlines() if "| kd " in line)
    assert "not reached" in kd_line
    explicit = tables.epochs_to_target(runs, target=70.0)
    assert row(explicit, "kd")["epoch"] == 3 and row(explicit, "ours")["epoch"] == 2
    assert set(explicit["target_source"]) == {"explicit"}


# ----------------------------------------------------------------------------- writers and plots


def test_write_tables_markdown_and_latex(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    make_run(arts, "ce", 0, [80, 81])
    make_run(arts, "kd_std", 0, [70, 72])  # never reaches the target; '_' must be escaped in LaTeX
    make_run(arts, "ours", 0, [85, 86])
    runs = discovery.find_runs(arts)
    acc = tables.accuracy_table(runs)
    files = table_format.write_tables(acc, tables.epochs_to_target(runs), tables.unfinished_table(runs), tmp_path / "out")
    # no unfinished run: unfinished.csv (data) but no empty unfinished.md table
    assert set(files) == {"accuracy.csv", "accuracy.md", "accuracy.tex", "epochs_to_target.csv",
                          "epochs_to_target.md", "unfinished.csv"}
    assert all(p.is_file() for p in files.values()) and not (tmp_path / "out" / "unfinished.md").exists()
    md = files["accuracy.md"].read_text()
    assert "| 81.00 " in md and "± 0.00" not in md and "+5.00" in md  # one seed: no std to show
    tex = files["accuracy.tex"].read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "kd\\_std" in tex and "resnet34 $\\to$ resnet9" in tex
    assert "81.00" in tex and "$\\pm$ 0.00" not in tex
    ari_cell = f"{(5 / (72 - 81)) * 100:.0f}"  # ours' ARI: kd_std has Delta < 0.5 -> n/a
    assert ari_cell not in tex and "n/a" in tex
    body = tex.split("\\midrule", 1)[1]
    assert "_" not in body.replace("\\_", "") and "%" not in body.replace("\\%", "")
    assert table_format.latex_escape("a_b & 5% #1 {x}") == "a\\_b \\& 5\\% \\#1 \\{x\\}"
    ett = pd.read_csv(files["epochs_to_target.csv"])
    assert ett.loc[ett["method"] == "kd_std", "epoch"].isna().all()
    assert "not reached" in files["epochs_to_target.md"].read_text()


def write_profile(root: Path) -> Path:
    profile = root / "fashion_mnist" / TEACHER_ID / "profile-p0000000"
    profile.mkdir(parents=True)
    n = 6
    pd.DataFrame({
        "layer": range(n), "module": [f"m{i}" for i in range(n)], "kind": "ReLU", "shape": "(8,4,4)",
        "dim": 128, "S": np.linspace(0, 0.5, n), "I": np.linspace(0.2, 0.6, n), "E": np.linspace(1, 0.5, n),
        "sqrtIE": 0.5, "Q": np.linspace(0.3, 0.9, n), "selected": [False, False, True, True, False, True],
    }).to_csv(profile / "quality.csv", index=False)
    (profile / "selection.yaml").write_text(yaml.safe_dump({"criterion": "Q", "k": 3, "layers": [2, 3, 5]}))
    return profile


def test_plots_are_written(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    make_run(arts, "ce", 0, [60, 70, 72])
    make_run(arts, "ce", 1, [62, 71, 73])
    make_run(arts, "ours", 0, [65, 74, 76])
    make_teacher(arts, [80, 85, 86])
    profile = write_profile(arts)
    paths = plots.plot_accuracy_curves(discovery.find_runs(arts), tmp_path / "plots",
                                        teachers=discovery.find_teachers(arts))
    paths += plots.plot_all_profiles(arts, tmp_path / "plots")
    paths.append(plots.plot_quality(pd.read_csv(profile / "quality.csv"), [2, 3], tmp_path / "q.png", title="t"))
    assert len(paths) == 3
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


@pytest.mark.stages
def test_run_end_to_end_and_errors(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    make_run(arts, "ce", 0, [60, 70])
    make_run(arts, "ours", 0, [65, 75])
    make_run(arts, "kd", 0, [61, 71], status="unfinished")
    make_teacher(arts, [80, 85])
    write_profile(arts)
    out = report.run(arts, tmp_path / "report", methods=["ours"])  # ce is kept for the gains
    assert set(out["accuracy"]["method"]) == {"teacher", "ce", "ours"}
    assert out["unfinished"].empty  # the kd run was filtered out
    assert "unfinished" not in out["markdown"] and not (tmp_path / "report" / "unfinished.md").exists()
    assert all(Path(p).is_file() for p in out["files"].values()) and len(out["plots"]) == 2
    assert "ours" in out["markdown"]["accuracy"] and "| ce " in out["markdown"]["epochs_to_target"]
    stale = arts / "fashion_mnist" / "resnet34-t1111111"  # a teacher still training: listed, not used
    stale.mkdir()
    pd.DataFrame({"epoch": [1], "test_acc": [99.0]}).to_csv(stale / "metrics.csv", index=False)
    full = report.run(arts, tmp_path / "report2")
    assert list(zip(full["unfinished"]["method"], full["unfinished"]["status"])) == [
        ("kd", "interrupted"), ("teacher", "interrupted")]
    assert list(full["accuracy"].loc[full["accuracy"]["method"] == "teacher", "best_mean"]) == [85.0]
    assert "interrupted" in (tmp_path / "report2" / "unfinished.md").read_text()
    with pytest.raises(DataError, match="not found"):
        report.run(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(DataError, match="available datasets: fashion_mnist"):
        report.run(arts, tmp_path / "x", datasets=["cifar100"])
    with pytest.raises(DataError, match="run stage 2 first"):
        (tmp_path / "empty").mkdir()
        report.run(tmp_path / "empty", tmp_path / "x")


# ----------------------------------------------------------------------------- the user's pair, library model names

LIB_PAIR = "tv:resnet18__timm:convnext_atto"


@pytest.mark.parametrize("text, expected", [
    ("resnet34:resnet9", "resnet34__resnet9"),
    ("resnet34__resnet9", "resnet34__resnet9"),
    ("resnet34->resnet9", "resnet34__resnet9"),
    (" resnet34:resnet9 ", "resnet34__resnet9"),
    ("tv:resnet18:timm:convnext_atto", LIB_PAIR),
    ("tv:resnet18__timm:convnext_atto", LIB_PAIR),
    ("tv:resnet18->timm:convnext_atto", LIB_PAIR),
    ("tv:resnet18:resnet9", "tv:resnet18__resnet9"),
    ("resnet34:timm:convnext_atto", "resnet34__timm:convnext_atto"),
    ("timm:vit_tiny_patch16_224.augreg_in21k:tv:mobilenet_v3_small", "timm:vit_tiny_patch16_224.augreg_in21k__tv:mobilenet_v3_small"),
])
def test_pair_dir_name_reads_every_spelling(text: str, expected: str) -> None:
    assert discovery.pair_dir_name(text) == expected


@pytest.mark.parametrize("text", [
    "resnet34", "tv:resnet18", "a:b:c", "tv::resnet9", "resnet34:", ":resnet9", "timm:tv:resnet18", "tv:timm:x:y",
    "a__b__c", "a__", "__b", "a->b->c", "a__b->c",
])
def test_pair_dir_name_refuses_what_does_not_read_one_way(text: str) -> None:
    with pytest.raises(ConfigError, match="teacher__student|teacher->student"):
        discovery.pair_dir_name(text)


def test_model_prefixes_are_the_registry_libraries() -> None:
    from common.models.external import LIBRARIES  # needs torch; discovery keeps its own copy

    assert set(discovery.MODEL_PREFIXES) == set(LIBRARIES)


def test_library_model_names_through_discovery_tables_and_plots(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    make_run(arts, "ce", 0, [60, 70], pair=LIB_PAIR)
    make_run(arts, "ours", 0, [65, 75], pair=LIB_PAIR)
    make_run(arts, "ce", 0, [50, 55])  # the resnet34__resnet9 pair, filtered out below
    runs = discovery.find_runs(arts, pairs=["tv:resnet18:timm:convnext_atto"])
    assert set(runs["pair"]) == {LIB_PAIR} and len(runs) == 2
    assert (runs["teacher"].iloc[0], runs["student"].iloc[0]) == ("tv:resnet18", "timm:convnext_atto")
    with pytest.raises(ConfigError, match="teacher__student"):
        discovery.find_runs(arts, pairs=["a:b:c"])
    acc = tables.accuracy_table(runs)
    assert "tv:resnet18 → timm:convnext_atto" in table_format.accuracy_markdown(acc)
    assert "tv:resnet18 $\\to$ timm:convnext\\_atto" in table_format.accuracy_latex(acc)
    assert table_format.pair_label(LIB_PAIR, "->") == "tv:resnet18->timm:convnext_atto"
    assert table_format.pair_label("resnet34-t0000000") == "resnet34-t0000000"  # a teacher id, not a pair
    [curve] = plots.plot_accuracy_curves(runs, tmp_path / "plots")
    assert curve.name == "curves_fashion_mnist_tv_resnet18__timm_convnext_atto.png"


def test_stage3_refuses_an_unreadable_pair_before_reading(tmp_path: Path, monkeypatch) -> None:
    import sys

    import stage3_evaluate

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["stage3_evaluate.py", "--artifacts", str(tmp_path / "none"), "--out", str(out),
                                      "--pairs", "resnet34:resnet9", "a:b:c"])
    with pytest.raises(ConfigError, match="'a:b:c'.*teacher__student"):
        stage3_evaluate.body()
    assert not out.exists()


def test_cells_and_ranks() -> None:
    assert table_format.number_cell(float("nan")) == "-" and table_format.number_cell(pd.NA) == "-"
    assert table_format.number_cell(1.234, "{:+.1f}") == "+1.2" and table_format.text_cell(None) == ""
    assert table_format.pm_cell(81.0, float("nan")) == "81.00" and table_format.pm_cell(81.0, 1.0) == "81.00 ± 1.00"
    order = sorted(["ours", "kd", "ours_ce", "ce", "teacher"], key=report_stats.method_rank)
    assert order == ["teacher", "ce", "kd", "ours_ce", "ours"]
    assert report_stats.headroom_floor(float("nan")) == 1.0 and report_stats.headroom_floor(0.8) == pytest.approx(1.6)
    assert plots.safe_filename("tv:resnet18__a b") == "tv_resnet18__a_b"


def test_accuracy_md_opens_with_sentences_from_the_numbers_and_explains_ari(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    for seed, (ce, kd, ours) in enumerate([(80, 83, 85), (82, 83, 87)]):
        make_run(arts, "ce", seed, [ce - 1, ce])
        make_run(arts, "kd", seed, [kd - 1, kd])
        run_dir = make_run(arts, "ours", seed, [ours - 1, ours])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["run"]["teacher_layers"] = [3, 7, 13, 16]  # as stage 2 records the layers it used
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    make_teacher(arts, [88, 90])
    runs = discovery.find_runs(arts)
    acc = tables.accuracy_table(runs, teachers=discovery.find_teachers(arts))
    opening = table_format.opening_sentences(acc, runs)
    assert opening.startswith("On fashion_mnist, resnet34 → resnet9: ours did best, 86.00 % over 2 seeds, +5.00 points over the CE student.")
    assert "The teacher reached 90.00 %, a headroom of +9.00 points over the CE student." in opening
    assert opening.rstrip().endswith("Q chose teacher layers 3, 7, 13, 16.")
    md = table_format.accuracy_markdown(acc)
    assert "81.00 ± 1.00" in md  # two seeds: the std is shown
    assert "ARI (average relative improvement)" in md and "250%" in md  # ours +5 / kd +2


def test_the_report_says_when_qs_layers_are_out_of_reach_of_mdistillers_feats(tmp_path):
    # mdistiller's and RepDistiller's `feats` hold only the stem and the stage outputs (the baseline
    # layers that stage 1's selection.yaml records); torchdistill's forward hooks reach every layer.
    from common.artifacts.layout import dir_name

    root = tmp_path / "artifacts"
    pair, teacher_id = "cifar:resnet32x4__cifar:resnet8x4", "cifar:resnet32x4-t0000000"
    for method, layers, best in (("ce", None, 70.0), ("ours", [4, 8, 15, 16], 72.0)):
        run_dir = root / "cifar100" / dir_name(pair) / f"{method}-aaaaaaaa" / "seed0"
        run_dir.mkdir(parents=True)
        run = {"method": method, "seed": 0, "teacher_id": teacher_id if layers else None, "teacher_layers": layers}
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2, "seed": 0}, "seeds": [0], "run": run}))
        pd.DataFrame({"epoch": [1, 2], "test_acc": [best - 5, best], "elapsed_s": [1.0, 2.0]}).to_csv(run_dir / "metrics.csv", index=False)
        (run_dir / "done").write_text("ok\n")
    profile_dir = root / "cifar100" / dir_name(teacher_id) / "profile-bbbbbbbb"
    profile_dir.mkdir(parents=True)
    (profile_dir / "selection.yaml").write_text(yaml.safe_dump({"layers": [4, 8, 15, 16], "baseline_layers": [5, 10, 15, 16]}))
    text = report.run(root, tmp_path / "reports")["markdown"]["accuracy"]
    assert "Q chose teacher layers 4, 8, 15, 16." in text
    assert "stem and stage outputs (layers 0, 5, 10, 15, 16), so layers 4, 8 are out of their reach" in text
    assert "torchdistill" in (tmp_path / "reports" / "accuracy.md").read_text()
    (profile_dir / "selection.yaml").write_text(yaml.safe_dump({"layers": [4, 8, 15, 16], "baseline_layers": [4, 8, 15, 16]}))
    assert "stage outputs" not in report.run(root, tmp_path / "reports")["markdown"]["accuracy"]  # all reachable: nothing said
