"""Portable artifact directories: no ':' in any name the tree gets (scp, rsync and tar read it as a
host separator; Windows refuses it), the same keys and hashes as before, and a tree made by the
previous version (model names with ':' in its directory names) still found and never redone."""
from __future__ import annotations

from pathlib import Path

import pytest

from common import distill, report
from common.artifacts import layout as artifacts
from common.artifacts.discovery import find_runs, find_teachers, pair_dir_name
from common.config import Config, load_config
from common.data.registry import load_data
from tests.fakedata import make_cifar10


@pytest.mark.parametrize("name", ["tv:resnet18-1a2b3c4d", "cifar:resnet32x4__cifar:resnet8x4", "timm:vit_tiny_patch16_224.augreg_in21k", "resnet9"])
def test_directory_names_hold_no_colon_and_read_back_as_the_model_names(name):
    on_disk = artifacts.dir_name(name)
    assert ":" not in on_disk and artifacts.model_name_of(on_disk) == name
    assert artifacts.model_name_of(name) == name  # a name of the previous version's tree reads as it is


def _config(tmp: Path) -> Config:
    root = tmp / "cifar10"
    make_cifar10(root, n_train=80, n_test=40, seed=0)
    return load_config(None, [
        "dataset.name=cifar10", f"dataset.root={root}", f"artifacts={tmp / 'artifacts'}",
        "teacher.name=cifar:resnet8", "student.name=cifar:resnet8",
        "teacher_train.epochs=1", "teacher_train.batch_size=40", "teacher_train.progress=false",
        "teacher_train.tracker=none", "teacher_train.device=cpu", "profile.device=cpu",
        "profile.subset_size=20", "profile.per_class_cap=2", "profile.batch_size=40", "profile.k=2",
        "method.name=kd", "train.epochs=1", "train.batch_size=40", "train.progress=false", "train.tracker=none", "train.device=cpu",
    ])


def _tree(root: Path) -> dict[str, int]:
    """Every file under root -> its mtime: what a rerun must leave as it is."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_tree_of_the_previous_version_is_found_and_not_redone(tmp_path):
    cfg = _config(tmp_path)
    data = load_data(cfg.dataset)
    (result,) = distill.run(cfg, data=data)  # stage 1 first (teacher, profile, cache), then one kd run
    root = Path(cfg.artifacts) / "cifar10"
    teacher_id = artifacts.teacher_id(cfg, data)
    assert teacher_id.startswith("cifar:resnet8-")  # the key keeps the model's name: hashes are unchanged
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert names and not [n for n in names if ":" in n]
    assert artifacts.teacher_dir(cfg, data).name == teacher_id.replace(":", "--")

    # The previous version wrote these two directories under the model names themselves.
    legacy_teacher, legacy_pair = root / teacher_id, root / "cifar:resnet8__cifar:resnet8"
    artifacts.teacher_dir(cfg, data).rename(legacy_teacher)
    artifacts.pair_dir(cfg).rename(legacy_pair)
    assert artifacts.teacher_dir(cfg, data) == legacy_teacher and artifacts.pair_dir(cfg) == legacy_pair
    before = _tree(root)

    (again,) = distill.run(cfg, data=data)  # finds the finished teacher, profile, cache and run: nothing is redone
    assert _tree(root) == before
    assert sorted(p.name for p in root.iterdir()) == sorted([legacy_teacher.name, legacy_pair.name])
    assert again.skipped and again.dir == legacy_pair / result.dir.parent.name / result.dir.name

    # Reading the tree back gives the model names, as for a new tree: the report pairs the run with its teacher.
    (teacher,) = find_teachers(Path(cfg.artifacts)).itertuples()
    assert (teacher.teacher, teacher.teacher_id, teacher.status) == ("cifar:resnet8", teacher_id, "finished")
    for pair in ("cifar:resnet8__cifar:resnet8", "cifar--resnet8__cifar--resnet8"):
        (run,) = find_runs(Path(cfg.artifacts), pairs=[pair]).itertuples()
        assert run.status == "finished" and run.teacher_id == teacher_id
    assert pair_dir_name("cifar--resnet8__cifar--resnet8") == "cifar:resnet8__cifar:resnet8"
    accuracy = report.run(Path(cfg.artifacts), tmp_path / "reports")["accuracy"]
    assert set(accuracy["method"]) == {"teacher", "kd"}
