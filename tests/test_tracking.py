"""Experiment tracking: TensorBoard event files by default (offline), wandb / trackio when asked
for and installed, a clear error when not, nothing with tracker=none."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.train import tracking
from common.checks import check_config
from common.config import load_config
from common.data.registry import load_data
from common.errors import ConfigError
from common.train.loop import fit
from tests.fakedata import make_fashion_mnist


class Linear(torch.nn.Module):
    """The smallest trainable the loop accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(28 * 28, 10)

    def forward(self, x, y, feats, logits, step=None):
        out = self.lin(x.flatten(1))
        return out, {"ce": torch.nn.functional.cross_entropy(out, y)}

    def forward_eval(self, x):
        return self.lin(x.flatten(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("track") / "fmnist"
    make_fashion_mnist(root, n_train=100, n_test=40, seed=0)
    return load_data(load_config(None, [f"dataset.root={root}"]).dataset)


def _fit(data, run_dir: Path, tracker: str, epochs: int = 3):
    cfg = load_config(None, [f"train.epochs={epochs}", "train.batch_size=20", "train.progress=false", f"train.tracker={tracker}"]).train
    torch.manual_seed(0)
    return fit(Linear(), data, cfg, run_dir, lr=0.01, train_indices=data.train_indices, desc="linear", run_config={"what": "test"})


def test_tensorboard_events_hold_every_epoch_row(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(data, tmp_path / "run", "tensorboard")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train_loss", "loss/loss_ce", "accuracy/train_acc", "accuracy/test_acc", "lr", "speed/images_per_s"} <= tags
    test_acc = events.Scalars("accuracy/test_acc")
    assert [e.step for e in test_acc] == [1, 2, 3]
    assert [e.value for e in test_acc] == pytest.approx(list(metrics["test_acc"]), rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(list(metrics["lr"]), rel=1e-5)


def test_tracker_none_writes_no_events(data, tmp_path):
    _fit(data, tmp_path / "run", "none", epochs=1)
    assert not (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "metrics.csv").exists()


def test_a_service_gets_init_every_epoch_and_finish(data, tmp_path, monkeypatch):
    calls: list[tuple] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or object()
    fake.log = lambda values, step: calls.append(("log", step, dict(values)))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    _fit(data, tmp_path / "run", "wandb", epochs=2)
    assert calls[0][0] == "init" and calls[0][1]["project"] == tracking.PROJECT and calls[0][1]["config"] == {"what": "test"}
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2] and calls[-1] == ("finish",)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert calls[2][2]["accuracy/test_acc"] == pytest.approx(metrics["test_acc"].iloc[1])


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_a_missing_service_is_one_config_error(kind, monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=f"train.tracker={kind} but the '{kind}' package is not installed; pip install {kind}"):
        check_config(load_config(None, [f"train.tracker={kind}"]))


def test_an_unknown_tracker_is_one_config_error():
    with pytest.raises(ConfigError, match="train.tracker is 'mlflow'; use one of tensorboard, wandb, trackio, none"):
        check_config(load_config(None, ["train.tracker=mlflow"]))


def test_tracker_is_not_part_of_the_run_key():
    from common.artifacts import layout as artifacts

    assert artifacts._train_key(load_config(None, ["train.tracker=none"]).train) == artifacts._train_key(load_config(None, []).train)


def test_epoch_scalars_groups_tags():
    row = {"epoch": 3, "train_loss": 1.0, "loss_feat": 0.5, "train_acc": 50.0, "val_acc": 40.0, "lr": 0.1, "images_per_s": 9.0}
    assert tracking.epoch_scalars(row) == {
        "loss/train_loss": 1.0, "loss/loss_feat": 0.5, "accuracy/train_acc": 50.0, "accuracy/val_acc": 40.0, "lr": 0.1, "speed/images_per_s": 9.0,
    }


@pytest.mark.stages
def test_the_profile_writes_its_quality_curve_per_layer(tmp_path):
    """Stage 1 logs S, I, E, Q per layer (step = layer index) for the teacher's tracker."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.profile import runner as profile
    from tests.test_pipeline import tiny_config

    cfg = tiny_config(tmp_path, "teacher_train.epochs=1", "profile.progress=false")
    prof = profile.run(cfg, load_data(cfg.dataset))
    quality = pd.read_csv(prof.dir / "quality.csv")
    events = EventAccumulator(str(prof.dir / "tb"))
    events.Reload()
    q = events.Scalars("quality/Q")
    assert [e.step for e in q] == list(quality["layer"])
    assert [e.value for e in q] == pytest.approx(list(quality["Q"]), rel=1e-5)
    assert {"quality/S", "quality/I", "quality/E"} <= set(events.Tags()["scalars"])
    assert list(prof.dir.parent.glob("tb/events.out.tfevents.*"))  # the teacher's training is tracked too
