"""A public checkpoint as the teacher, as it is (`teacher.finetune`, common.models.as_is.teacher_as_is).

A `cifar:` zoo file in the published layout, `{"model": state_dict, ...}`, for the dataset's
classes is evaluated, profiled and distilled from without a training epoch; `finetune=true`
trains it; `finetune=false` where that cannot be is one ConfigError; the directories of
teachers without a checkpoint keep the keys they had before the setting existed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common import distill, report
from common.artifacts import layout as artifacts
from common.artifacts.discovery import find_teachers
from common.checks import load_data_checked
from common.config import Config, load_config
from common.data.registry import Data, load_data
from common.errors import ConfigError
from common.files import sha256_file
from common.models import create_model
from common.profile import runner as profile
from common.profile import teacher as teacher_module
from common.models.as_is import teacher_as_is
from common.profile.teacher import WEIGHTS, ensure_teacher
from tests.fakedata import make_cifar10, make_fashion_mnist


def _config(tmp: Path, *extra: str) -> Config:
    root = tmp / "cifar10"
    if not root.exists():
        make_cifar10(root, n_train=120, n_test=200, seed=0)  # 200: accuracies in steps of 0.5%, so a wrong model rarely ties
    return load_config(None, [
        "dataset.name=cifar10", f"dataset.root={root}", f"artifacts={tmp / 'artifacts'}",
        "teacher.name=cifar:resnet8", "student.name=resnet9", "student.width=0.125",
        "teacher_train.epochs=1", "teacher_train.batch_size=32", "teacher_train.progress=false",
        "teacher_train.tracker=none", "teacher_train.device=cpu", "profile.device=cpu",
        "profile.subset_size=40", "profile.per_class_cap=4", "profile.batch_size=64", "profile.k=2",
        "method.name=kd", "train.epochs=1", "train.batch_size=32", "train.progress=false", "train.tracker=none", "train.device=cpu",
        *extra,
    ])


def _checkpoint(tmp: Path, num_classes: int = 10, name: str = "resnet8") -> tuple[Path, dict[str, torch.Tensor]]:
    """A zoo model saved as RepDistiller's train_teacher.py saves it (ckpt_epoch_240.pth)."""
    torch.manual_seed(1)
    model = create_model(f"cifar:{name}", num_classes=num_classes)
    path = tmp / f"{name}_{num_classes}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(12.5)}, path)
    return path, state


def _accuracy(state: dict[str, torch.Tensor], data: Data) -> float:
    """Top-1 of the checkpoint's model on the test split, computed here without the loop."""
    model = create_model("cifar:resnet8", num_classes=data.num_classes)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(data.normalize(data.test.images, torch.device("cpu")))
    return 100.0 * int((logits.argmax(1) == data.test.labels).sum()) / len(data.test.labels)


def test_a_checkpoint_of_the_datasets_classes_is_used_as_it_is(tmp_path, caplog, monkeypatch):
    path, state = _checkpoint(tmp_path)
    cfg = _config(tmp_path, f"teacher.pretrained={path}")
    data = load_data_checked(cfg)
    assert cfg.teacher.finetune == "auto" and teacher_as_is(cfg, data)

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained")

    monkeypatch.setattr(teacher_module, "fit", no_training)
    with caplog.at_level(logging.INFO, logger="kd"):
        prof = profile.run(cfg, data)
    tdir = artifacts.teacher_dir(cfg, data)
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if " epoch 1/" in line or "training 1 epochs" in line]
    measured = _accuracy(state, data)
    as_is = [line for line in lines if "used as it is" in line]
    assert len(as_is) == 1 and f"{measured:.2f}%" in as_is[0] and str(path) in as_is[0]

    saved = torch.load(tdir / WEIGHTS, map_location="cpu", weights_only=True)
    assert saved["best_epoch"] == 0 and set(saved["best"]) == set(state) == set(saved["last"])
    assert all(torch.equal(saved["best"][k], v) and torch.equal(saved["last"][k], v) for k, v in state.items())

    metrics = pd.read_csv(tdir / "metrics.csv")
    assert list(metrics["epoch"]) == [0] and metrics["test_acc"].iloc[0] == pytest.approx(measured, abs=1e-9)
    summary = yaml.safe_load((tdir / "summary.yaml").read_text())
    assert summary["epochs"] == 0 and summary["best_epoch"] == 0 and summary["best_test_acc"] == pytest.approx(measured, abs=1e-9)
    assert (tdir / artifacts.DONE).exists() and not (tdir / artifacts.FAILED).exists() and not (tdir / "checkpoint.pt").exists()
    assert yaml.safe_load((tdir / artifacts.CONFIG).read_text())["run"]["as_is"] is True

    # Stage 3's teacher row reads the measured accuracy.
    (row,) = find_teachers(Path(cfg.artifacts)).itertuples()
    assert row.status == "finished" and row.best_test_acc == pytest.approx(measured, abs=1e-9) and row.epochs == 0

    # Stage 1 profiled this teacher: its manifest names teacher.pt's hash and the cache has the selected layers.
    assert prof.dir.parent == tdir and (prof.dir / "quality.csv").is_file() and prof.features.is_file()
    assert prof.manifest.data["teacher"]["sha256"] == sha256_file(tdir / WEIGHTS)
    assert len(prof.selected) == 2

    # Distilled from (stage 2, KD on its cached logits), and stage 3's teacher row is the measured accuracy.
    distill.run(cfg, data=data)
    accuracy = report.run(Path(cfg.artifacts), tmp_path / "reports")["accuracy"]
    (teacher_row,) = accuracy[accuracy["method"] == "teacher"].itertuples()
    assert teacher_row.best_mean == pytest.approx(measured, abs=1e-9)
    assert len(accuracy[accuracy["method"] == "kd"]) == 1

    # A rerun skips: teacher.pt is not written again.
    before = (tdir / WEIGHTS).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kd"):
        assert ensure_teacher(cfg, data) == tdir
    assert (tdir / WEIGHTS).stat().st_mtime_ns == before
    assert any("finished, skipping" in r.getMessage() for r in caplog.records)


def test_finetune_true_trains_the_checkpoint_in_a_directory_of_its_own(tmp_path):
    path, state = _checkpoint(tmp_path)
    cfg = _config(tmp_path, f"teacher.pretrained={path}", "teacher.finetune=true")
    data = load_data_checked(cfg)
    assert not teacher_as_is(cfg, data)
    tdir = ensure_teacher(cfg, data)
    assert list(pd.read_csv(tdir / "metrics.csv")["epoch"]) == [1]
    trained = torch.load(tdir / WEIGHTS, map_location="cpu", weights_only=True)["last"]
    assert not torch.equal(trained["fc.weight"], state["fc.weight"])
    # auto and false both use it as it is, in one directory; true has another.
    as_is = {artifacts.teacher_dir(_config(tmp_path, f"teacher.pretrained={path}", f"teacher.finetune={v}"), data) for v in ("auto", "false")}
    assert len(as_is) == 1 and tdir not in as_is
    # Nothing is trained as it is, so the training settings do not key it.
    assert artifacts.teacher_dir(_config(tmp_path, f"teacher.pretrained={path}", "teacher_train.epochs=7"), data) in as_is


def test_another_checkpoint_of_the_same_name_never_reuses_a_fine_tuned_teacher(tmp_path):
    """Fine-tuned teachers are keyed by the checkpoint's file name; its content is recorded and
    checked, so a different file under that name is an error, not someone else's teacher."""
    path, _ = _checkpoint(tmp_path)
    cfg = _config(tmp_path, f"teacher.pretrained={path}", "teacher.finetune=true")
    data = load_data_checked(cfg)
    tdir = ensure_teacher(cfg, data)
    assert ensure_teacher(cfg, data) == tdir  # the same file: finished, reused
    torch.manual_seed(7)
    torch.save({"epoch": 240, "model": create_model("cifar:resnet8", num_classes=10).state_dict()}, path)
    assert artifacts.teacher_dir(cfg, data) == tdir  # the key alone cannot tell them apart
    with pytest.raises(ConfigError, match="rename one of the two files"):
        ensure_teacher(cfg, data)


def test_finetune_false_with_other_classes_is_one_config_error(tmp_path):
    path, _ = _checkpoint(tmp_path, num_classes=100)
    cfg = _config(tmp_path, f"teacher.pretrained={path}", "teacher.finetune=false")
    with pytest.raises(ConfigError) as err:
        load_data_checked(cfg)
    message = str(err.value)
    assert "100 classes" in message and "has 10" in message and str(path) in message
    assert "give a checkpoint trained on the dataset's 10 classes" in message and "\n" not in message
    assert not (Path(cfg.artifacts) / "cifar10").exists()  # refused before any teacher directory exists
    # auto fine-tunes such a file (here the zoo loader then refuses other classes, its own error).
    assert not teacher_as_is(_config(tmp_path, f"teacher.pretrained={path}"), load_data(cfg.dataset))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["teacher.finetune=maybe"], "teacher.finetune='maybe' is not allowed; use auto"),
        (["teacher.finetune=false"], "teacher.pretrained is not set"),
        (["student.finetune=true"], "unknown config key 'student.finetune'"),
    ],
)
def test_bad_finetune_settings(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, *extra)


def test_the_paper_models_imagenet_loaders_always_fine_tune(tmp_path):
    # load_resnet replaces conv1 and fc whatever the file holds (METHOD 3.1): never as it is,
    # and the file need not be read to know it.
    make_fashion_mnist(tmp_path / "fm", n_train=40, n_test=20)
    cfg = load_config(None, [f"dataset.root={tmp_path / 'fm'}", "teacher.name=resnet18", f"teacher.pretrained={tmp_path / 'r18.pth'}"])
    data = load_data(cfg.dataset)
    assert not teacher_as_is(cfg, data)
    cfg.teacher.finetune = False
    with pytest.raises(ConfigError, match="replaces the first layer and the classifier"):
        teacher_as_is(cfg, data)


# teacher ids computed with the code before teacher.finetune existed (the same configs on the
# committed tree): the directories of teachers without a checkpoint, and of fine-tuned
# checkpoints, must be found again.
@pytest.mark.parametrize(
    "dataset, extra, expected",
    [
        ("cifar10", ["teacher.name=cifar:resnet8"], "cifar:resnet8-fe7c8542"),
        ("cifar10", ["teacher.name=cifar:resnet8", "teacher.pretrained=/nowhere/ckpt_epoch_240.pth", "teacher.finetune=true"], "cifar:resnet8-7e435314"),
        ("fashion_mnist", ["teacher.name=resnet18", "teacher.width=0.125"], "resnet18-18aa433e"),
        ("fashion_mnist", ["teacher.name=resnet18", "teacher.pretrained=/nowhere/resnet18-f37072fd.pth"], "resnet18-1707a081"),
    ],
)
def test_teacher_keys_without_a_checkpoint_used_as_is_are_unchanged(tmp_path, dataset, extra, expected):
    root = tmp_path / dataset
    if dataset == "cifar10":
        make_cifar10(root, n_train=120, n_test=40, seed=0)
    else:
        make_fashion_mnist(root, n_train=200, n_test=60, seed=0)
    cfg = load_config(None, [f"dataset.name={dataset}", f"dataset.root={root}", f"artifacts={tmp_path / 'a'}", "teacher_train.epochs=2", *extra])
    assert artifacts.teacher_id(cfg, load_data(cfg.dataset)) == expected


def test_a_torchvision_checkpoint_is_used_as_it_is_only_for_the_datasets_classes(tmp_path):
    # external.load_checkpoint keeps the file's head when its shape fits, else a fresh one:
    # an ImageNet file (1000 classes) on CIFAR-10 is fine-tuned, a 10-class file used as it is.
    cfg = _config(tmp_path, "teacher.name=tv:resnet18")
    data = load_data(cfg.dataset)
    for classes, as_is in ((10, True), (1000, False)):
        path = tmp_path / f"resnet18_{classes}.pth"
        torch.save(create_model("tv:resnet18", num_classes=classes).state_dict(), path)
        cfg.teacher.pretrained = str(path)
        assert teacher_as_is(cfg, data) is as_is
    cfg.teacher.finetune = False
    with pytest.raises(ConfigError, match="has 1000 classes and dataset cifar10 has 10; .* new 10-class head"):
        teacher_as_is(cfg, data)
