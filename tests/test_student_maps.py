"""Student-layer maps (method.student_layers = baseline | depth | Q | a list): the pairing rule,
the run keys, the bad-input errors, and the CE student's profile keyed by its checkpoint."""
from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from common import distill
from common.artifacts import layout
from common.config import load_config
from common.data.registry import load_data
from common.errors import ConfigError
from common.files import sha256_file
from common.layers.pairing import depth_student_layers, in_depth_order, nearest_student_layer, random_layer_lists, relative_depth
from common.methods import resolve_run_method
from common.profile import student as student_profile
from tests.fakedata import make_fashion_mnist

TINY = ["teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125", "train.epochs=1",
        "train.batch_size=32", "train.progress=false", "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=64"]


# ----------------------------------------------------------------------------- pairing (pure)


def _brute_force(depths: list[Fraction], candidates: list[int], n_student: int) -> list[int]:
    """The rule written out: every increasing choice for the depth-sorted layers, least total
    distance, then the deepest (lexicographically greatest) list."""
    order = sorted(range(len(depths)), key=lambda i: depths[i])
    best = None
    for combo in itertools.combinations(sorted(candidates), len(depths)):
        cost = sum(abs(depths[i] - Fraction(j + 1, n_student)) for i, j in zip(order, combo))
        if best is None or cost < best[0] or (cost == best[0] and combo > best[1]):
            best = (cost, combo)
    out = [0] * len(depths)
    for i, j in zip(order, best[1]):
        out[i] = j
    return out


def test_depth_map_is_the_least_distance_increasing_assignment() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_teacher, n_student = int(rng.integers(2, 20)), int(rng.integers(2, 9))
        k = int(rng.integers(1, min(n_teacher, n_student) + 1))
        layers = [int(i) for i in rng.choice(n_teacher, size=k, replace=False)]  # any order, as an explicit list
        depths = [relative_depth(i, n_teacher) for i in layers]
        got = depth_student_layers(depths, range(n_student), n_student)
        assert got == _brute_force(depths, list(range(n_student)), n_student), (layers, n_teacher, n_student)
        assert len(set(got)) == k  # distinct
        assert [got[i] for i in np.argsort(layers, kind="stable")] == sorted(got)  # depth order kept


def test_depth_map_examples_collisions_and_refusal() -> None:
    d = lambda layers, n: [relative_depth(i, n) for i in layers]  # noqa: E731
    # ResNet34 (18 layers) -> ResNet9 (6): 14 and 15 both nearest to student layer 4; 15 moves to 5
    assert [nearest_student_layer(i, 18, 6) for i in (4, 8, 14, 15)] == [1, 2, 4, 4]
    assert depth_student_layers(d([4, 8, 14, 15], 18), range(6), 6) == [1, 2, 4, 5]
    assert depth_student_layers(d([15, 14, 8, 4], 18), range(6), 6) == [5, 4, 2, 1]  # each keeps its partner
    # no collision: each layer's own nearest student layer, ties deeper (as the single-layer arms)
    assert all(depth_student_layers(d([i], 18), range(6), 6) == [nearest_student_layer(i, 18, 6)] for i in range(18))
    assert depth_student_layers(d([3, 7, 11, 15], 19), range(11), 11) == [1, 4, 6, 8]
    # two teachers' layers at one relative depth (several teachers): distinct, given order among equals
    assert depth_student_layers([Fraction(1, 2), Fraction(1, 2)], range(4), 4) == [1, 2]
    assert depth_student_layers(d([0, 1, 2], 3), [0, 2, 5], 6) == [0, 2, 5]  # only the candidates given
    with pytest.raises(ValueError, match="only 2 student layers"):
        depth_student_layers(d([0, 1, 2], 3), range(2), 2)


def test_in_depth_order_and_random_lists() -> None:
    d = [relative_depth(i, 10) for i in (7, 2, 5)]
    assert in_depth_order(d, [4, 0, 9]) == [9, 0, 4]  # shallowest teacher layer (2) gets the shallowest student layer
    with pytest.raises(ValueError):
        in_depth_order(d, [1, 2])
    drawn = random_layer_lists(range(6), 3, {(0, 1, 2)}, 3, 0)
    assert drawn == random_layer_lists(range(6), 3, {(0, 1, 2)}, 3, 0) and random_layer_lists(range(6), 3, set(), 5, 0)[:1] != []
    assert len(set(drawn)) == 3 and (0, 1, 2) not in drawn and all(list(x) == sorted(set(x)) for x in drawn)
    assert len(random_layer_lists(range(4), 3, {(0, 1, 2)}, 9, 0)) == 3  # C(4, 3) = 4 lists, one taken: stops


# ----------------------------------------------------------------------------- config: keys and errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("maps")
    make_fashion_mnist(tmp / "fmnist", n_train=200, n_test=60, seed=0)
    base = [f"dataset.root={tmp / 'fmnist'}", f"artifacts={tmp / 'artifacts'}", *TINY]
    cfg = load_config(None, base)
    return tmp, base, load_data(cfg.dataset)


def _dir(base: list[str], data, *extra: str) -> str:
    """The run directory's name stage 2 gives ours with teacher layers 2, 4, 6, 8 and `extra`."""
    cfg = load_config(None, [*base, "method.name=ours", "method.teacher_layers=[2,4,6,8]", *extra])
    spec = resolve_run_method(cfg)
    teacher_layers, student_layers = distill.resolve_layer_lists(cfg, spec, data)
    return distill.run_dirs(cfg, data, spec, teacher_layers, [0], student_layers)[0].parent.name


def test_run_keys_baseline_unchanged_maps_keyed_by_resolved_layers(tiny) -> None:
    _, base, data = tiny
    # Golden names from the code before the maps existed (commit c769aaf): those runs are found again.
    assert _dir(base, data) == "ours-4f1601f5"
    assert _dir(base, data, "method.student_layers=[1,2,3,4]") == "ours-04ab805a"
    assert _dir(base, data, "method.student_layers=[0,2,4,5]") == "ours-39f9c2ae"
    # resnet18 layers 2, 4, 6, 8 (depths 3/10 .. 9/10) -> resnet9 layers 1, 2, 3, 4: the run of that explicit list,
    # not the `baseline` word's run (the same list, keyed as it always was)
    cfg = load_config(None, [*base, "method.name=ours", "method.teacher_layers=[2,4,6,8]", "method.student_layers=depth"])
    assert distill.resolve_layer_lists(cfg, resolve_run_method(cfg), data) == ([2, 4, 6, 8], [1, 2, 3, 4])
    assert _dir(base, data, "method.student_layers=depth") == "ours-04ab805a" != _dir(base, data)
    with pytest.raises(ValueError, match="resolved student layers"):
        distill.run_dirs(cfg, data, resolve_run_method(cfg), [2, 4, 6, 8], [0])


def _refused(base: list[str], data, *extra: str, match: str) -> None:
    cfg = load_config(None, [*base, *extra])
    with pytest.raises(ConfigError, match=match):
        distill.run(cfg, data=data)
    assert not Path(cfg.artifacts).exists()  # refused before a teacher, profile or run directory was made


def test_maps_that_cannot_be_honoured_are_refused_before_anything_trains(tiny) -> None:
    tmp, base, data = tiny
    base = [*base[:1], f"artifacts={tmp / 'refused'}", *base[2:]]
    _refused(base, data, "profile.k=7", "method.student_layers=depth", match="needs 7 distinct student layers .* only 6")
    _refused(base, data, "profile.k=7", "method.student_layers=Q", match="needs 7 distinct student layers")
    _refused(base, data, "method.student_layers=[0,1,2,9]", match="student layer 9 is out of range")
    _refused(base, data, "method.teacher_layers=[1,2]", "method.student_layers=Q", match="top-4 by Q .* as many teacher layers")
    _refused(base, data, "method.student_layers=Q", "profile.train_student_ce=false", match="no finished run")


# ----------------------------------------------------------------------------- the CE student's profile


@pytest.mark.stages
def test_student_profile_built_from_seed0_ce_and_keyed_by_its_checkpoint(tiny) -> None:
    tmp, base, data = tiny
    cfg = load_config(None, [*base[:1], f"artifacts={tmp / 'profiled'}", *base[2:], "method.name=ours", "method.student_layers=Q"])
    assert student_profile.load(cfg, data) is None
    built = student_profile.manifest_for(cfg, data)  # trains seed 0's ce run first, then profiles its student.pt
    ce = student_profile.ce_run_dir(cfg, data)
    assert ce.name == "seed0" and ce.parent.name.startswith("ce-") and (ce / layout.DONE).exists()
    sha = sha256_file(ce / "student.pt")
    assert built.data["student"]["sha256"] == sha and built.dir == layout.student_profile_dirs(cfg, data, sha)[1]
    assert len(built.top_q) == 4 and built.top_q == sorted(built.top_q) and set(built.top_q) <= set(range(6))
    assert [row["index"] for row in built.data["layers"]] == list(range(6))
    manifest_file = built.dir / student_profile.MANIFEST
    stamp = manifest_file.stat().st_mtime_ns
    assert student_profile.manifest_for(cfg, data).data == built.data and manifest_file.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert [t.dir for t in layout.iter_teachers(cfg.artifacts)] == []  # never listed as a teacher by stage 3
    # stage 2 pairs the teacher's layers with it in depth order
    spec = resolve_run_method(cfg)
    teacher = [1, 3, 5, 7]
    cfg_t = load_config(None, [*base[:1], f"artifacts={tmp / 'profiled'}", *base[2:], "method.name=ours", "method.student_layers=Q",
                               "method.teacher_layers=[7,5,3,1]"])
    assert distill.resolve_layer_lists(cfg_t, resolve_run_method(cfg_t), data)[1] == built.top_q[::-1]
    explicit = load_config(None, [*base[:1], f"artifacts={tmp / 'profiled'}", *base[2:], "method.name=ours",
                                  f"method.student_layers=[{','.join(map(str, built.top_q))}]"])
    assert distill.run_dirs(cfg, data, spec, teacher, [0], built.top_q) == distill.run_dirs(explicit, data, resolve_run_method(explicit), teacher, [0])
    # another checkpoint (retrained, other content) is never matched to this profile
    state = torch.load(ce / "student.pt", weights_only=True)
    state["best"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state["best"].items()}
    torch.save(state, ce / "student.pt")
    assert student_profile.load(cfg, data) is None
    again = student_profile.manifest_for(load_config(None, [*base[:1], f"artifacts={tmp / 'profiled'}", *base[2:],
                                                           "profile.train_student_ce=false"]), data)
    assert again.dir != built.dir and again.data["student"]["sha256"] == sha256_file(ce / "student.pt") != sha
