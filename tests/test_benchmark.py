"""The CIFAR-100 KD benchmark end to end at tiny size, on generated CIFAR-100 pickles.

A `cifar:resnet32x4` teacher saved in the published checkpoint layout ({"model": state_dict})
is used as it is (never trained), stage 1 profiles it, `ours`, `dkd` and `crd` distil it into
`cifar:resnet8x4` for one epoch, and stage 3 shows the published CIFAR-100 numbers beside them.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from common import distill
from common.config import load_config
from common.data import load_data
from common.models import create_model
from common.profile import runner as profile
from common.report import runner as report
from tests.fakedata import make_cifar100

pytestmark = pytest.mark.stages  # runs the three stages in-process


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmark")
    make_cifar100(tmp / "data", n_train=300, n_test=100, seed=0)  # 3 training images per class
    torch.manual_seed(0)
    teacher = create_model("cifar:resnet32x4", num_classes=100, in_channels=3, image_size=32)
    checkpoint = tmp / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"  # the public file's name and layout
    checkpoint.parent.mkdir()
    torch.save({"model": teacher.state_dict(), "epoch": 240}, checkpoint)
    overrides = [
        "dataset.name=cifar100", f"dataset.root={tmp / 'data'}", f"artifacts={tmp / 'artifacts'}",
        "teacher.name=cifar:resnet32x4", f"teacher.pretrained={checkpoint}",
        "student.name=cifar:resnet8x4",
        "profile.k=3",  # resnet8x4's baseline list has three layers, paired one-to-one with Q's top 3
        "profile.subset_size=200", "profile.per_class_cap=2", "profile.batch_size=100",
        "train.epochs=1", "train.batch_size=50", "train.progress=false", "teacher_train.progress=false",
        "profile.progress=false", "method.crd_negatives=64", "train.tracker=none",
    ]
    cfg = load_config(None, overrides)
    data = load_data(cfg.dataset)
    prof = profile.run(cfg, data)
    runs = {m: distill.run(load_config(None, [*overrides, f"method.name={m}"]), seeds=[0])[0] for m in ("ours", "dkd", "crd")}
    out = report.run(Path(cfg.artifacts), tmp / "reports")
    return tmp, cfg, data, prof, runs, teacher, out


def test_the_published_teacher_is_used_as_it_is(benchmark):
    tmp, cfg, data, prof, _, teacher, _ = benchmark
    tdir = prof.dir.parent
    metrics = pd.read_csv(tdir / "metrics.csv")
    assert len(metrics) == 1  # evaluated once, never trained
    saved = torch.load(tdir / "teacher.pt", map_location="cpu", weights_only=True)
    assert saved["best_epoch"] == 0  # the best epoch is the checkpoint itself
    for key, value in teacher.state_dict().items():
        assert torch.equal(saved["best"][key], value), key


def test_ours_dkd_and_crd_distil_the_zoo_pair(benchmark):
    *_, runs, _, _ = benchmark
    for method, result in runs.items():
        metrics = pd.read_csv(result.dir / "metrics.csv")
        assert (result.dir / "done").exists() and len(metrics) == 1, method
        assert metrics["train_loss"].notna().all() and 0 <= metrics["test_acc"].iloc[0] <= 100


def test_stage3_shows_the_published_numbers_beside_the_runs(benchmark):
    *_, out = benchmark
    accuracy = out["accuracy"].set_index("method")
    # resnet32x4 -> resnet8x4, as the CRD (Tables 1-2) and DKD papers report them
    assert accuracy.loc["teacher", "published"] == pytest.approx(79.42)
    assert accuracy.loc["dkd", "published"] == pytest.approx(76.32)
    assert accuracy.loc["crd", "published"] == pytest.approx(75.51)
    assert pd.isna(accuracy.loc["ours", "published"])  # no published number for the paper's method
    markdown = out["markdown"]["accuracy"]
    assert "published (%)" in markdown and "CRD" in markdown and "DKD" in markdown


def test_ours_runs_under_the_benchmark_recipe_too(benchmark):
    """configs/cifar100_kd_benchmark.yaml (SGD, multistep, crop + flip, so the teacher runs live)
    trains the logit-free method as well as the paper's AdamW/OneCycle recipe does."""
    tmp, cfg, *_ = benchmark
    overrides = [
        f"dataset.root={cfg.dataset.root}", f"artifacts={cfg.artifacts}", f"teacher.pretrained={cfg.teacher.pretrained}",
        "method.name=ours", "profile.k=3", "profile.subset_size=200", "profile.per_class_cap=2", "profile.batch_size=100",
        "train.epochs=2", "train.milestones=[1]", "train.batch_size=50", "train.progress=false", "train.tracker=none",
        "profile.progress=false", "teacher_train.progress=false",
    ]
    bench_cfg = load_config("configs/cifar100_kd_benchmark.yaml", overrides)
    assert (bench_cfg.train.optimizer, bench_cfg.train.schedule, bench_cfg.train.augment) == ("sgd", "multistep", True)
    result = distill.run(bench_cfg, seeds=[0])[0]
    metrics = pd.read_csv(result.dir / "metrics.csv")
    assert (result.dir / "done").exists() and list(metrics["epoch"]) == [1, 2]
    assert metrics["lr"].iloc[-1] == pytest.approx(0.05 * 0.1)  # the benchmark LR, x0.1 after the milestone
    assert set(metrics.columns) >= {"loss_feat", "loss_ce"} and metrics["loss_feat"].gt(0).all()
