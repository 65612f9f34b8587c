"""Several teachers: the selection rules and the depth-order pairing (pure), the config and its
one-teacher identity, run keys, S/I/E's scale, and a tiny two-teacher pipeline (shared teacher
directories, the cached multi-teacher source, bad input refused before anything trains)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from common import cli, distill
from common.train import multi_teacher
from common.artifacts import discovery, layout
from common.config import load_config
from common.data.registry import load_data
from common.errors import ConfigError, DataError
from common.methods import resolve_run_method
from common.profile import multi
from common.profile import runner as profile
from common.profile.manifest import MANIFEST
from common.quality import layer_quality
from common.study import multi as study_multi
from common.study.plan import arm_config
from tests.fakedata import make_fashion_mnist


def rows(q: list[float]) -> list[dict]:
    return [{"index": i, "Q": v, "S": v, "I": v, "E": v, "sqrtIE": v} for i, v in enumerate(q)]


# ----------------------------------------------------------------------------- selection and pairing (pure)


def test_pooled_takes_the_top_k_over_all_teachers_and_skips_undefined() -> None:
    a, b = rows([0.1, 0.9, math.nan, 0.5]), rows([0.8, 0.2, 0.7])
    assert multi.select_pooled([a, b], 3) == [(0, 1), (1, 0), (1, 2)]
    assert multi.select_pooled([rows([0.5]), rows([0.5])], 1) == [(0, 0)]  # a tie goes to the earlier teacher
    with pytest.raises(DataError, match="only 2 teacher layers"):
        multi.select_pooled([rows([math.nan, 1.0]), rows([2.0])], 3)


def test_per_teacher_takes_k_over_m_of_each() -> None:
    a, b = rows([0.1, 0.9, 0.8, 0.5]), rows([0.05, 0.02, 0.07])
    assert multi.quotas(5, 2) == [3, 2]
    assert multi.select_per_teacher([a, b], 4) == [(0, 1), (0, 2), (1, 0), (1, 2)]  # b's low Q still gets 2
    assert multi.select_per_teacher([a, b], 3) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ConfigError, match="k >= the number of teachers"):
        multi.select_per_teacher([a, b, a], 2)


def test_baseline_half_alternates_the_lists() -> None:
    assert multi.baseline_pairs([[3, 7, 13, 16], [2, 5, 9, 12]], 4) == [(0, 3), (0, 13), (1, 5), (1, 12)]


def test_depth_order_pairing_within_each_teacher_ties_deeper() -> None:
    # teacher 0 has 10 layers, teacher 1 has 5: (0, 1) and (1, 0) are both at relative depth 1/5
    pairs = [(1, 4), (0, 1), (1, 0), (0, 8)]
    got = multi.pair_in_depth_order(pairs, [10, 5], [9, 2, 5, 7])
    assert got == [(1, 0, 2), (0, 1, 5), (0, 8, 7), (1, 4, 9)]  # the tie: the larger layer index goes deeper
    with pytest.raises(ConfigError, match="student layer 2 is claimed twice"):
        multi.pair_in_depth_order(pairs, [10, 5], [2, 2, 5, 7])
    with pytest.raises(ConfigError, match="give as many"):
        multi.pair_in_depth_order(pairs, [10, 5], [2, 5, 7])


def test_teachers_of_other_data_classes_or_subsets_are_refused() -> None:
    one = {"name": "a", "dataset": {"name": "d", "fingerprint": "x"}, "num_classes": 10, "subsets": {"seed": 0}}
    multi.check_compatible([one, {**one, "name": "b"}])
    for key, value, what in (("dataset", {"name": "d", "fingerprint": "y"}, "dataset"), ("num_classes", 100, "class count"),
                             ("subsets", {"seed": 1}, "subsets")):
        with pytest.raises(DataError, match=what):
            multi.check_compatible([one, {**one, "name": "b", key: value}])


# ----------------------------------------------------------------------------- config


def test_teacher_configs_names_mappings_and_refusals() -> None:
    cfg = load_config(None, ["teacher.width=0.25", "teachers=[resnet34, {name: vgg19, width: 0.5}]"])
    a, b = multi.teacher_configs(cfg)
    assert (a.name, a.width, b.name, b.width) == ("resnet34", 0.25, "vgg19", 0.5)
    assert multi.joined_name(cfg) == "resnet34+vgg19" and multi.is_multi(cfg)
    with pytest.raises(ConfigError, match="names resnet34 twice"):
        multi.teacher_configs(load_config(None, ["teachers=[resnet34, vgg19, resnet34]"]))
    with pytest.raises(ConfigError, match="names vgg19 twice"):  # finetune without a checkpoint: the same teacher
        multi.teacher_configs(load_config(None, ["teachers=[vgg19, {name: vgg19, finetune: true}]"]))
    with pytest.raises(ConfigError, match="teacher_rule"):
        load_config(None, ["teacher_rule=mixed"])
    p = cli.parser("x")
    args = p.parse_intermixed_args(["--teacher", "resnet34 vgg19"])
    assert cli.build_config(args, {}).teachers == ["resnet34", "vgg19"]
    one = load_config(None, ["teachers=[vgg19]", "teacher.width=0.25"])
    assert not multi.is_multi(one)
    assert multi.single_config(one) == load_config(None, ["teacher.name=vgg19", "teacher.width=0.25"])


def test_s_i_e_are_scale_free_and_i_is_bounded_by_subset_b() -> None:
    """Why pooled Q compares teachers at all: S, I and E do not change when a layer's features are
    rescaled (a VGG's activations are larger than a ResNet's), and are computed on the same subsets."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    feats = torch.randn(40, 6, 3, 3, generator=g) + labels.view(-1, 1, 1, 1).float()
    base = layer_quality(feats, labels, 1000, subset_size=40, per_class_cap=10)
    scaled = layer_quality(feats * 37.5, labels, 1000, subset_size=40, per_class_cap=10)
    for key in ("S", "I", "E", "Q"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-6), key  # float32 features: rounding only
    assert -1 <= base["S"] <= 1 and 0 <= base["I"] <= math.log(10) / math.log(5) and base["E"] > 0


# ----------------------------------------------------------------------------- a tiny pipeline

TINY = [
    "teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125",
    "teacher_train.epochs=1", "teacher_train.batch_size=32", "teacher_train.progress=false",
    "train.epochs=1", "train.batch_size=32", "train.progress=false", "profile.progress=false",
    "profile.subset_size=60", "profile.per_class_cap=6", "profile.batch_size=64", "seeds=[0]",
]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    make_fashion_mnist(tmp / "fmnist", n_train=120, n_test=40, seed=0)
    base = [f"dataset.root={tmp / 'fmnist'}", f"artifacts={tmp / 'artifacts'}", *TINY]
    cfg = load_config(None, [*base, "teachers=[resnet18, vgg11]", "method.name=ours"])
    data = load_data(cfg.dataset)
    manifest = multi.run(cfg, data)
    return tmp, base, cfg, data, manifest


@pytest.mark.stages
def test_stage1_profiles_each_teacher_in_its_single_directory(two) -> None:
    tmp, base, cfg, data, manifest = two
    assert manifest.names == ["resnet18", "vgg11"] and (manifest.dir / MANIFEST).is_file()
    assert len(manifest.data["layers"]) == sum(manifest.n_layers)
    for name in ("resnet18", "vgg11"):
        single = load_config(None, [*base, f"teacher.name={name}"])
        pdir = layout.profile_dir(single, data)
        stamp = (pdir / MANIFEST).stat().st_mtime_ns
        assert profile.run(single, data).dir == pdir  # the single run finds the pair run's profile
        assert (pdir / MANIFEST).stat().st_mtime_ns == stamp
    assert multi.run(cfg, data).data == manifest.data  # rerun: nothing new


@pytest.mark.stages
def test_one_listed_teacher_is_todays_run(two) -> None:
    tmp, base, cfg, data, _ = two
    single = load_config(None, [*base, "method.name=ours"])
    first = distill.run(single, data=data)[0]
    again = distill.run(load_config(None, [*base, "method.name=ours", "teachers=[resnet18]"]), data=data)[0]
    assert again.skipped and again.dir == first.dir
    assert yaml.safe_load((first.dir / layout.CONFIG).read_text())["teachers"] == []


@pytest.mark.stages
def test_multi_teacher_run_keys_layers_and_report(two) -> None:
    tmp, base, cfg, data, manifest = two
    spec = resolve_run_method(cfg)
    result = distill.run(cfg, data=data)[0]
    assert not result.skipped and (result.dir / layout.DONE).is_file()
    assert result.dir.parent.parent.name == "resnet18+vgg11__resnet9"
    run = yaml.safe_load((result.dir / layout.CONFIG).read_text())["run"]
    plan = multi_teacher.resolve(cfg, spec, data, manifest)
    assert run["teacher_layers"] == plan.labels() and all(lab.split(":")[0] in ("resnet18", "vgg11") for lab in plan.labels())
    assert [p["student_layer"] for p in run["pairs"]] == plan.student_layers == [1, 2, 3, 4]
    assert run["teacher_id"] == "+".join(run["teacher_ids"])  # one string: stage 3 groups runs by it
    found = discovery.find_runs(tmp / "artifacts", pairs=["resnet18+vgg11__resnet9"])
    assert found["teacher_layers"].tolist() == [" ".join(plan.labels())]  # stage 3 names each layer's teacher
    assert distill.run(cfg, data=data)[0].skipped
    # the key holds every teacher's identity and layers: another rule or layer list is another directory
    other = dataclasses.replace(cfg, teacher_rule="per_teacher")
    per = multi_teacher.resolve(other, spec, data, manifest)
    key = multi_teacher.run_key(cfg, data, spec, plan)
    assert [t["id"] for t in key["teachers"]] == [layout.teacher_id(c, data) for c in plan.teacher_configs]
    if per.triples != plan.triples:
        assert multi_teacher.run_dirs(other, data, spec, per, [0]) != multi_teacher.run_dirs(cfg, data, spec, plan, [0])
    moved = dataclasses.replace(plan, triples=[(t, layer, j) for t, layer, j in plan.triples][::-1])
    assert multi_teacher.run_key(cfg, data, spec, moved) != key


@pytest.mark.stages
def test_cached_teachers_give_each_teachers_own_features(two) -> None:
    tmp, base, cfg, data, manifest = two
    spec = resolve_run_method(cfg)
    plan = multi_teacher.resolve(cfg, spec, data, manifest)
    source = multi_teacher.teacher_source(cfg, data, plan, torch.device("cpu"))
    assert all(type(s).__name__ == "CachedTeacher" for s in source.sources)
    live = multi_teacher.teacher_source(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher_source="live")),
                                        data, plan, torch.device("cpu"))
    rows = torch.as_tensor(data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed))
    batches = source.batch_order(rows, 32, torch.Generator().manual_seed(3))
    assert len(batches) == len(rows) // 32
    images = data.normalize(data.train.images[batches[0]])  # as the loop hands them over
    feats, logits = source.batch(batches[0], images)
    assert logits is None and sorted(feats) == list(range(len(plan.triples)))
    live_feats, _ = live.batch(batches[0], images)
    for p in feats:  # float16 cache against the live float32 forward
        torch.testing.assert_close(feats[p], live_feats[p], rtol=2e-2, atol=2e-2)


@pytest.mark.stages
def test_bad_input_is_one_error_before_anything_trains(two) -> None:
    tmp, base, cfg, data, _ = two
    before = sorted(p.relative_to(tmp) for p in (tmp / "artifacts").rglob("*"))
    cases = [
        (["teachers=[resnet18, vgg11]", "method.name=ours", "teacher_rule=per_teacher", "profile.k=1"], "per_teacher"),
        (["teachers=[resnet18, vgg11, resnet18]", "method.name=ours"], "twice"),
        (["teachers=[resnet18, vgg11]", "method.name=ours", "method.student_layers=[1,1,2,3]"], "claimed twice"),
        (["teachers=[resnet18, vgg11]", "method.name=kd"], "logit-free"),
        (["teachers=[resnet18, vgg11]", "method.name=ours", "method.teacher_layers=[1,2,3,4]"], "one teacher's layers"),
    ]
    for extra, words in cases:
        with pytest.raises(ConfigError, match=words):
            distill.run(load_config(None, [*base, *extra]), data=data)
    assert sorted(p.relative_to(tmp) for p in (tmp / "artifacts").rglob("*")) == before


@pytest.mark.stages
def test_study_arms_alone_are_the_single_teacher_runs(two) -> None:
    tmp, base, cfg, data, _ = two
    arms = {a.name: a for a in study_multi.multi_arms(dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=None)))}
    assert list(arms) == ["resnet18_alone", "vgg11_alone", "pooled", "per_teacher", "baseline_half", "ce"]
    pair = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=None))
    single = load_config(None, [*base, "teacher.name=vgg11"])
    assert multi.single_config(arm_config(pair, arms["vgg11_alone"])) == dataclasses.replace(
        single, method=dataclasses.replace(single.method, name="ours"))
    assert Path(str(study_multi.default_out(pair))).name == "resnet18+vgg11__resnet9"


def test_study_findings_name_the_better_teacher_and_whether_q_predicts_it() -> None:
    import pandas as pd

    teachers = pd.DataFrame([dict(teacher="a", best_Q=0.9, n=3, acc_mean=85.0), dict(teacher="b", best_Q=1.2, n=3, acc_mean=87.0)])
    arms = pd.DataFrame([dict(arm="pooled", sentence="pooled vs b_alone: ...")])
    found = study_multi.findings(teachers, arms)
    assert found[0].startswith("b is the better single teacher") and found[1].startswith("Q predicts it")
    found = study_multi.findings(teachers.assign(best_Q=[1.5, 1.2]), arms)
    assert "**does not predict**" in found[1] and found[2] == "pooled vs b_alone: ..."
    assert "tie" in study_multi.findings(teachers.assign(acc_mean=[86.0, 86.0]), arms)[0]
