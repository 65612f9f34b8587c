"""The layer-selection study (issue 10): its plan, its statistics on hand-made numbers, the
headroom sentence of every report, and the whole study end to end on a tiny stand-in dataset."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from common import distill
from common.artifacts import discovery
from common.report import runner as report
from common.report import stats as report_stats
from common.study import runner as study
from common.report import tables
from common.config import load_config, to_dict
from common.data.registry import load_data
from common.files import sha256_file
from common.profile import student as student_profile
from common.errors import ConfigError, DataError
from common.study.plan import CONTROL, REFERENCE, SINGLE, STUDENT, arm_config, check_base_config, nearest_student_layer, plan_for, plan_lines, study_plan
from common.study.stats import Interval, bootstrap_spearman, difference_sentence, paired_difference, spearman
from tests.fakedata import make_fashion_mnist
from tests.test_report import make_run, make_teacher

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


# ----------------------------------------------------------------------------- plan


def manifest(q: list[float], *, k: int = 2, criterion: str = "Q", how: str = "top-2 by Q", top_k: dict | None = None) -> dict:
    """A profile.yaml-like manifest: S = I = E = Q for simplicity unless NaN."""
    layers = [{"index": i, "module": f"m{i}", "S": v, "I": v, "E": v, "Q": v, "sqrtIE": v} for i, v in enumerate(q)]
    finite = [(v, i) for i, v in enumerate(q) if not math.isnan(v)]
    best = sorted(i for _, i in sorted(finite, key=lambda t: (-t[0], t[1]))[:k])
    tk = {"k": k, **{c: best for c in ("Q", "S", "I", "E", "sqrtIE")}, **(top_k or {})}
    return {"layers": layers, "top_k": tk, "selection": {"criterion": criterion, "how": how, "layers": best},
            "baseline_layers": [1, 5]}


def test_nearest_student_layer_by_relative_depth_ties_deeper() -> None:
    assert nearest_student_layer(17, 18, 6) == 5  # last meets last
    assert nearest_student_layer(2, 18, 6) == 0  # 3/18 == 1/6 exactly
    assert nearest_student_layer(0, 18, 6) == 0
    assert nearest_student_layer(9, 18, 6) == 2  # 10/18 = 0.556: 3/6 = 0.5 is nearer than 4/6
    assert nearest_student_layer(2, 4, 2) == 1  # 3/4 is midway between 1/2 and 2/2: the deeper one
    assert [nearest_student_layer(i, 4, 8) for i in range(4)] == [1, 3, 5, 7]
    with pytest.raises(ValueError):
        nearest_student_layer(4, 4, 2)


def test_plan_arms_and_their_exact_overrides() -> None:
    q = [0.1, 0.9, 0.3, NAN, 0.8, 0.2, 0.3, 0.05]  # layer 3 undefined; 2 and 6 tie on Q
    plan = study_plan(manifest(q), n_student=4, student_baseline=[1, 3])
    names = [a.name for a in plan.arms]
    assert names[:12] == ["ce", "ours", "ours_s", "ours_i", "ours_e", "ours_sqrtie", "stl_seplin", "reversed_q",
                          "bottom_q", "random_1", "random_2", "random_3"]
    assert names[12:19] == ["layer_0", "layer_1", "layer_2", "layer_4", "layer_5", "layer_6", "layer_7"]
    assert names[19:] == ["student_depth", "student_q", "student_random_1", "student_random_2", "student_random_3"]
    assert plan.defined_layers == (0, 1, 2, 4, 5, 6, 7) and plan.k == 2
    assert any("layer_3" in note and "undefined" in note for note in plan.notes)
    arm = plan.arm
    assert arm("ce").overrides == ("method.name=ce",) and arm("ce").kind == REFERENCE
    assert arm("ours").overrides == ("method.name=ours",) and arm("ours").teacher_layers == (1, 4)
    assert arm("ours_sqrtie").overrides == ("method.name=ours_sqrtie",)
    assert arm("stl_seplin").teacher_layers == (1, 5) and arm("stl_seplin").student_layers == (1, 3)
    assert arm("reversed_q").overrides == ("method.name=ours", "method.teacher_layers=[4,1]")
    assert arm("reversed_q").student_layers == (1, 3)  # deepest teacher layer -> shallowest student layer
    assert arm("bottom_q").teacher_layers == (0, 7)  # lowest Q among the defined layers
    assert arm("layer_4").overrides == ("method.name=ours", "method.teacher_layers=[4]", "method.student_layers=[2]")
    assert arm("layer_7").student_layers == (3,) and arm("layer_7").kind == SINGLE
    assert {a.kind for a in plan.arms if a.name.startswith(("ours", "random", "bottom", "reversed", "stl"))} == {CONTROL}
    draws = [arm(f"random_{d}").teacher_layers for d in (1, 2, 3)]
    for drawn in draws:
        assert len(set(drawn)) == 2 and list(drawn) == sorted(drawn) and set(drawn) <= set(plan.defined_layers)
    assert plan_lines(plan)[7] == "reversed_q\tmethod.name=ours method.teacher_layers=[4,1]"
    # student maps: ours' teacher layers and overrides, only the student layers vary
    assert {a.kind for a in plan.arms[19:]} == {STUDENT} and all(a.teacher_layers == (1, 4) for a in plan.arms[19:])
    assert arm("student_depth").overrides == ("method.name=ours", "method.student_layers=depth")
    assert arm("student_depth").student_layers == (0, 2)  # 2/8 -> 1/4 exactly; 5/8 midway between 2/4 and 3/4: deeper
    assert arm("student_q").overrides == ("method.name=ours", "method.student_layers=Q") and arm("student_q").student_layers == ()
    randoms = [arm(f"student_random_{d}").student_layers for d in (1, 2, 3)]
    assert len(set(randoms)) == 3 and not {(1, 3), (0, 2)} & set(randoms)  # never the baseline or depth list
    assert all(list(r) == sorted(r) and len(set(r)) == 2 and set(r) <= {0, 1, 2, 3} for r in randoms)
    assert arm("student_random_1").overrides == ("method.name=ours", f"method.student_layers=[{randoms[0][0]},{randoms[0][1]}]")
    profiled = study_plan(manifest(q), n_student=4, student_baseline=[1, 3], student_top_q=[3, 0], student_draws=0)
    assert profiled.arm("student_q").student_layers == (0, 3) and "student_random_1" not in [a.name for a in profiled.arms]
    as_ours = study_plan(manifest(q), n_student=4, student_baseline=[1, 3], student_top_q=[1, 3], student_draws=0)
    assert any(n.startswith("student_q: the student's baseline list [1, 3]") for n in as_ours.notes)
    as_depth = study_plan(manifest(q), n_student=4, student_baseline=[1, 3], student_top_q=[0, 2], student_draws=0)
    assert any(n.startswith("student_depth and student_q: the same student layers [0, 2]") for n in as_depth.notes)


def test_plan_random_draws_are_seeded_and_stable() -> None:
    m = manifest([0.1 * i for i in range(12)], k=3)
    base = dict(n_student=6, student_baseline=[1, 2, 3])
    draws = lambda plan: [a.teacher_layers for a in plan.of_kind(CONTROL) if a.name.startswith("random")]  # noqa: E731
    three = draws(study_plan(m, **base))
    assert three == draws(study_plan(m, **base))  # fixed by the seed
    assert draws(study_plan(m, **base, random_draws=5))[:3] == three  # more draws keep the first ones
    assert draws(study_plan(m, **base, random_seed=1)) != three
    bottom = (0, 1, 2)
    assert len(set(three)) == 3 and not {tuple(sorted((9, 10, 11))), bottom} & set(three)  # never repeats a list
    tiny = study_plan(manifest([0.3, 0.2, 0.1, 0.0]), 3, [0, 2], random_draws=5)  # C(4, 2) = 6 lists, 2 taken
    assert len([a for a in tiny.arms if a.name.startswith("random")]) == 4 and any("random_5" in n for n in tiny.notes)


def test_plan_options_and_refusals() -> None:
    m = manifest([0.5, 0.4, 0.3, 0.2, 0.1])
    plan = study_plan(m, 3, [0, 2], layers=[0, -1])
    assert [a.name for a in plan.of_kind(SINGLE)] == ["layer_0", "layer_4"]
    other = study_plan(manifest([0.5, 0.4, 0.3], criterion="S", how="top-2 by S"), 3, [0, 2])
    assert other.arm("ours").overrides == ("method.name=ours", "method.teacher_layers=Q")  # the profile selects by S
    no_e = study_plan(manifest([0.5, 0.4, 0.3], top_k={"E": None}), 3, [0, 2])
    assert "ours_e" not in [a.name for a in no_e.arms] and any("ours_e" in n for n in no_e.notes)
    with pytest.raises(ConfigError, match="profile.k=3"):
        study_plan(m, 3, [0, 1, 2])
    with pytest.raises(DataError, match="fewer than k"):
        study_plan(manifest([NAN, NAN, 0.1]), 3, [0, 2])
    with pytest.raises(ConfigError, match="random-draws"):
        study_plan(m, 3, [0, 2], random_draws=0)
    with pytest.raises(ConfigError, match="student-draws"):
        study_plan(m, 3, [0, 2], student_draws=-1)
    few = study_plan(manifest([0.5, 0.4, 0.3], k=3), 2, [0, 1, 1])  # a 2-layer student cannot take k=3 distinct layers
    assert not few.of_kind(STUDENT) and any("student-map arms left out" in n for n in few.notes)
    only_k = study_plan(manifest([0.5, 0.4]), 2, [0, 1])
    assert "bottom_q" not in [a.name for a in only_k.arms] and any("bottom_q" in n for n in only_k.notes)


def test_arm_config_equals_stage2_overrides_and_method_fields_are_refused() -> None:
    base = ["train.epochs=3", "student.width=0.25"]
    cfg = load_config(None, base)
    arm = study_plan(manifest([0.5, 0.4, 0.3]), 3, [0, 2]).arm("layer_1")
    assert to_dict(arm_config(cfg, arm)) == to_dict(load_config(None, base + list(arm.overrides)))
    check_base_config(cfg)
    with pytest.raises(ConfigError, match="method.teacher_layers"):
        check_base_config(load_config(None, ["method.teacher_layers=[1,2]"]))


# ----------------------------------------------------------------------------- statistics


def test_spearman_with_ties_against_hand_computed_value() -> None:
    # ranks x = [1, 2.5, 2.5, 4, 5], y = [2, 1, 4, 3, 5]: sum dx*dy = 6.5, sum dx^2 = 9.5, sum dy^2 = 10
    x, y = [1, 2, 2, 3, 4], [2, 1, 4, 3, 5]
    assert spearman(x, y) == pytest.approx(6.5 / math.sqrt(95))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert spearman([1, 2, NAN, 3], [1, 2, 9, 3]) == pytest.approx(1.0)  # NaN pairs dropped


def test_bootstrap_interval_contains_estimate_narrows_and_is_seeded() -> None:
    criterion = [0, 2, 1, 3, 5, 4]
    few = [[80 + i - 2, 80 + i + 2, 80 + i] for i in range(6)]  # 3 seeds per layer
    many = [seeds * 4 for seeds in few]  # the same spread over 12 seeds
    ci = bootstrap_spearman(criterion, few, seed=0)
    assert ci.estimate == pytest.approx(spearman(criterion, [np.mean(a) for a in few])) and ci.n == 6
    assert ci.contains(ci.estimate) and ci.low < ci.estimate
    wide, narrow = ci.high - ci.low, bootstrap_spearman(criterion, many, seed=0)
    assert narrow.contains(narrow.estimate) and narrow.high - narrow.low < wide
    assert bootstrap_spearman(criterion, few, seed=0) == ci
    assert bootstrap_spearman(criterion, few, seed=1) != ci
    single = bootstrap_spearman(criterion, [[80.0 + i] for i in range(6)])  # one seed: nothing to resample
    assert single.low == single.high == single.estimate
    partial = bootstrap_spearman([1, 2, 3, NAN], [[1.0], [2.0], [], [4.0]])  # no runs / NaN criterion: dropped
    assert partial.n == 2 and math.isnan(partial.estimate) and not partial.defined


def test_paired_difference_mean_and_t_interval_by_hand() -> None:
    ours = {0: 80.0, 1: 82.0, 2: 81.0}
    other = {0: 79.0, 1: 80.0, 2: 81.0, 3: 70.0}  # seed 3 has no pair: left out
    diff = paired_difference(ours, other)  # d = [1, 2, 0]: mean 1, sd (ddof 1) 1
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert diff.n == 3 and diff.estimate == pytest.approx(1.0)
    assert (diff.low, diff.high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    one = paired_difference({0: 80.0}, {0: 79.5, 1: 70.0})
    assert one.n == 1 and one.estimate == pytest.approx(0.5) and not one.defined
    none = paired_difference({0: 80.0}, {1: 80.0})
    assert none.n == 0 and math.isnan(none.estimate)


def test_difference_sentences() -> None:
    assert difference_sentence("ours", "random 1", Interval(1.5, 0.5, 2.5, 3)) == (
        "ours beat random 1 by 1.50 ± 1.00 points (95 % CI +0.50 to +2.50, n = 3 paired seeds).")
    assert difference_sentence("ours", "random 1", Interval(-1.5, -2.5, -0.5, 3)).startswith("random 1 beat ours by 1.50 ± 1.00")
    same = difference_sentence("ours", "reversed", Interval(0.3, -0.2, 0.8, 3))
    assert same.startswith("no difference detected between ours and reversed") and "contains 0" in same
    assert "undefined with n = 1" in difference_sentence("ours", "x", Interval(0.4, NAN, NAN, 1))
    assert "nothing to compare" in difference_sentence("ours", "x", Interval(NAN, NAN, NAN, 0))


def _layers(q: list[float], acc: list[float]) -> pd.DataFrame:
    table = pd.DataFrame({"layer": range(len(q)), "Q": q, "acc_mean": acc, "n": 3})
    table["rank_acc"] = table["acc_mean"].rank(ascending=False, method="min").astype("Int64")
    return table


def _correlations(rho: float, low: float, high: float, s_rho: float = NAN) -> pd.DataFrame:
    rows = [("Q", rho, low, high), ("S", s_rho, NAN, NAN)]
    return pd.DataFrame([dict(criterion=c, rho=r, low=lo, high=hi, n_layers=4) for c, r, lo, hi in rows])


def test_findings_say_plainly_where_q_fails() -> None:
    controls = pd.DataFrame([dict(arm="random_1", label="random draw 1", diff_low=-2.0, diff_high=-0.5, sentence="random 1 beat ours")])
    found = study.findings(_layers([0.9, 0.5, 0.4, 0.1], [80.0, 82.0, 81.0, 83.0]), _correlations(-0.8, -1.0, -0.4, 0.5),
                           controls, top_q=[0, 1])
    text = "\n".join(found)
    assert "**Q fails**: it ranks layer 0 (80.00 %) first" in text and "transfers worst" in text
    assert "**Q's top-2 are not the 2 best single layers**: Q picks [0, 1], the best single layers are [1, 3]" in text
    assert "**Q orders the layers against their transfer value**" in text
    assert "S ranks the layers better than Q" in text and "**random_1 (random draw 1) beat Q's layers**" in text
    good = study.findings(_layers([0.9, 0.5, 0.4, 0.1], [84.0, 83.0, 81.0, 80.0]), _correlations(0.9, 0.5, 1.0),
                          controls.assign(diff_low=0.5, diff_high=2.0), top_q=[0, 1])
    text = "\n".join(good)
    assert "**" not in text and "is also the best" in text and "are the 2 best single layers" in text
    unsure = study.findings(_layers([0.9, 0.5, 0.4], [82.0, 83.0, 81.0]), _correlations(0.1, -0.5, 0.7), controls.iloc[:0], top_q=[0])
    assert any("**No evidence that Q orders layers" in s for s in unsure)
    assert any("ranks 2 of 3 by single-layer accuracy (best: layer 1, 83.00 %)" in s for s in unsure)


def test_mismatched_layers_are_reported() -> None:
    runs = pd.DataFrame([
        dict(arm="reversed_q", seed=0, status="finished", teacher_layers="4 1", student_layers="1 3",
             recorded_teacher_layers="1 4", recorded_student_layers="1 3"),
        dict(arm="ours", seed=0, status="finished", teacher_layers="1 4", student_layers="1 3",
             recorded_teacher_layers="1 4", recorded_student_layers="1 3"),
    ])
    assert study.mismatches(runs) == ["reversed_q seed 0: planned teacher layers [4 1] -> student [1 3], stage 2 ran [1 4] -> [1 3]"]


# ----------------------------------------------------------------------------- headroom (every report)


def headroom_of(root: Path, teacher: list[float], ce: list[float]) -> pd.Series:
    for seed, acc in enumerate(ce):
        make_run(root, "ce", seed, [acc - 5, acc])
    make_run(root, "ours", 0, [70.0, 75.0])
    make_teacher(root, teacher)
    accuracy = tables.accuracy_table(discovery.find_runs(root), teachers=discovery.find_teachers(root))
    table = tables.headroom_table(accuracy)
    assert len(table) == 1
    return table.iloc[0]


def test_headroom_rule_and_sentence(tmp_path: Path) -> None:
    small = headroom_of(tmp_path / "a", [80.0, 86.0], [85.4, 85.6])  # 0.5 points < 1
    assert small["headroom"] == pytest.approx(0.5) and small["too_small"]
    assert "too small for distillation to show anything" in small["sentence"] and "headroom +0.50 points" in small["sentence"]
    noisy = headroom_of(tmp_path / "b", [90.0], [85.0, 89.0])  # 3 points, but the CE std is 2: below 4
    assert noisy["headroom"] == pytest.approx(3.0) and noisy["too_small"] and "below 4.00 points" in noisy["sentence"]
    ample = headroom_of(tmp_path / "c", [95.0], [85.0, 86.0])
    assert ample["headroom"] == pytest.approx(9.5) and not ample["too_small"] and "too small" not in ample["sentence"]
    assert not report_stats.headroom_too_small(1.0, 0.1) and report_stats.headroom_too_small(0.99, NAN)
    one_seed = headroom_of(tmp_path / "d", [95.0], [85.0])
    assert "one CE seed" in one_seed["sentence"] and not one_seed["too_small"]


def test_report_shows_headroom_under_the_accuracy_table(tmp_path: Path) -> None:
    arts = tmp_path / "artifacts"
    make_run(arts, "ce", 0, [60.0, 85.5])
    make_run(arts, "ce", 1, [60.0, 85.7])
    make_run(arts, "ours", 0, [65.0, 85.0])
    make_teacher(arts, [80.0, 86.0])
    out = report.run(arts, tmp_path / "report")
    md = (tmp_path / "report" / "accuracy.md").read_text()
    assert "+0.40 (headroom)" in md and "too small for distillation to show anything" in md
    assert pd.read_csv(tmp_path / "report" / "headroom.csv")["too_small"].tolist() == [True]
    assert "too small" in out["markdown"]["headroom"]
    no_ce = tmp_path / "no_ce"
    make_run(no_ce, "ours", 0, [65.0, 85.0])
    make_teacher(no_ce, [80.0, 86.0])
    assert "headroom is unknown" in report.run(no_ce, tmp_path / "r2")["markdown"]["headroom"]


# ----------------------------------------------------------------------------- end to end


TINY = [
    "teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125",
    "teacher_train.epochs=1", "teacher_train.batch_size=32", "teacher_train.progress=false",
    "train.epochs=1", "train.batch_size=32", "train.progress=false", "profile.progress=false",
    "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=64", "seeds=[0,1]",
]
LAYERS = [0, 3, 5, 9]  # resnet18 has 10 generalized layers; a few keep the test short


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """Stage 1, then every arm of the plan for 2 seeds, as `make study` runs them."""
    tmp = tmp_path_factory.mktemp("study")
    make_fashion_mnist(tmp / "fmnist", n_train=200, n_test=60, seed=0)
    overrides = [f"dataset.root={tmp / 'fmnist'}", f"artifacts={tmp / 'artifacts'}", *TINY]
    cfg = load_config(None, overrides)
    data = load_data(cfg.dataset)
    plan, _ = plan_for(cfg, data, build_profile=True, layers=LAYERS)
    trained = {}
    for arm in plan.arms:
        trained[arm.name] = {r.seed: r.dir for r in distill.run(arm_config(cfg, arm), data=data)}
    return tmp, overrides, cfg, data, plan, trained


def test_study_end_to_end(studied) -> None:
    tmp, _, cfg, data, plan, trained = studied
    out = study.run(cfg, tmp / "report", data=data, layers=LAYERS, n_boot=200)
    files = out["files"]
    assert all(p.is_file() for p in files.values()) and len(out["plots"]) == 2
    runs = out["runs"]
    assert (runs["status"] == "finished").all() and len(runs) == 2 * len(plan.arms)
    for r in runs.itertuples():  # each arm's runs are the directories stage 2 trained
        assert Path(r.path) == trained[r.arm][r.seed]
    reversed_q = runs[runs["arm"] == "reversed_q"]
    assert (reversed_q["recorded_teacher_layers"] == reversed_q["teacher_layers"]).all()  # stage 2 keeps the order
    layers = pd.read_csv(files["layer_study.csv"])
    assert layers["layer"].tolist() == LAYERS and (layers["n"] == 2).all()
    assert {"S", "I", "E", "Q", "acc_mean", "acc_std", "student_layer", "rank_Q", "rank_acc"} <= set(layers.columns)
    assert layers["student_layer"].tolist() == [0, 1, 3, 5]
    correlations = pd.read_csv(files["layer_study_correlations.csv"])
    assert correlations["criterion"].tolist() == ["Q", "S", "I", "E", "sqrtIE"] and (correlations["n_layers"] == 4).all()
    controls = pd.read_csv(files["layer_study_controls.csv"])
    assert controls["arm"].tolist() == [a.name for a in plan.arms if a.kind in (REFERENCE, CONTROL)]
    maps = pd.read_csv(files["layer_study_student_maps.csv"])
    assert maps["arm"].tolist() == ["ours", *(a.name for a in plan.of_kind(STUDENT))]
    assert (maps["teacher_layers"] == maps.iloc[0]["teacher_layers"]).all() and (maps["n_pairs"].dropna() == 2).all()
    # student_q: the CE student's own top-k by Q, profiled from seed 0's ce run, the same list for both seeds
    profiled = student_profile.load(cfg, data)
    assert profiled is not None and profiled.data["student"]["sha256"] == sha256_file(trained["ce"][0] / "student.pt")
    q_runs = runs[runs["arm"] == "student_q"]
    assert (q_runs["recorded_student_layers"] == " ".join(map(str, profiled.top_q))).all()
    assert "## Student-layer maps vs ours" in files["layer_study.md"].read_text()
    others = controls[controls["arm"] != "ours"]
    assert (others["n_pairs"] == 2).all() and others["sentence"].str.len().gt(0).all()
    md = files["layer_study.md"].read_text()
    for heading in ("## Findings", "## Single teacher layers", "## Rank correlation", "## Multi-layer controls", "## How to read this"):
        assert heading in md
    assert "headroom" in md and "Runs not finished" not in md


def test_study_report_lists_missing_seeds_and_ignores_other_settings(studied) -> None:
    tmp, _, cfg, data, plan, _ = studied
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    distill.run(arm_config(other, plan.arm("ours")), seeds=[0], data=data)  # another regime: never mixed in
    three = dataclasses.replace(cfg, seeds=[0, 1, 2])
    out = study.run(three, tmp / "report3", data=data, layers=LAYERS, n_boot=100)
    ours = out["controls"].set_index("arm").loc["ours"]
    assert ours["n"] == 2
    missing = out["runs"][out["runs"]["status"] == "missing"]
    assert set(missing["seed"]) == {2} and len(missing) == len(plan.arms)
    assert "## Runs not finished" in out["markdown"]
    # the other regime has no ce run, so no student profile: student_q has no run directory yet
    alone = study.run(other, tmp / "report_other", data=data, layers=LAYERS, n_boot=50)
    q = alone["runs"][alone["runs"]["arm"] == "student_q"]
    assert (q["status"] == "missing").all() and (q["path"] == study.NOT_PROFILED).all()
    assert alone["plan"].arm("student_q").student_layers == () and "nothing to compare yet" in " ".join(alone["findings"])


def test_study_command_lines(studied) -> None:
    """`python -m common.study plan` prints the plan for the shell loop; stage 3 --study reads it back."""
    tmp, overrides, _, _, plan, _ = studied
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    layers = ["--layers", " ".join(map(str, LAYERS))]
    printed = subprocess.run([sys.executable, "-m", "common.study", "plan", *layers, *overrides], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines() == plan_lines(plan)
    out = tmp / "cli_report"
    reported = subprocess.run([sys.executable, "stage3_evaluate.py", "--study", "--out", str(out), *layers, "--", *overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr
    assert (out / "layer_study.md").is_file() and "## Findings" in reported.stdout


def test_stage3_refuses_study_flags_without_study(monkeypatch) -> None:
    import stage3_evaluate

    monkeypatch.setattr(sys, "argv", ["stage3_evaluate.py", "--seeds", "0 1", "train.epochs=2"])
    with pytest.raises(ConfigError, match="--seeds, train.epochs=2 only apply with --study"):
        stage3_evaluate.body()
    monkeypatch.setattr(sys, "argv", ["stage3_evaluate.py", "--study", "--dataset", "fashion_mnist", "train.epochs=2"])
    with pytest.raises(ConfigError, match="put overrides after --"):
        stage3_evaluate.body()
