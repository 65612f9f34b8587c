"""Experiment tracking: every run's epoch metrics (and the profile's S/I/E/Q curve) in the tools
researchers already read, beside metrics.csv, which stays the record stage 3 reads.

`tensorboard` (the default) writes event files into `<run dir>/tb/`, offline: `tensorboard
--logdir artifacts` shows every teacher, profile and student. `wandb` and `trackio` log to those
services when the package is installed (W&B obeys WANDB_MODE=offline); `none` writes nothing.
Nothing here needs the network unless the user picks a service that does.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Protocol

from common.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio", "none")
PROJECT = "logit-free-kd"  # the wandb / trackio project every run logs to


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars `values` (tag -> number) at `step` (an epoch, or a layer index for a profile)."""
        ...

    def close(self) -> None:
        ...


def check(kind: str) -> None:
    """A tracker that is unknown or not installed is a config error before any work."""
    if kind not in TRACKERS:
        raise ConfigError(f"train.tracker is '{kind}'; use one of {', '.join(TRACKERS)}")
    if kind in ("wandb", "trackio") and importlib.util.find_spec(kind) is None:
        raise ConfigError(f"train.tracker={kind} but the '{kind}' package is not installed; pip install {kind} into .venv, or use train.tracker=tensorboard")


def open_tracker(kind: str, directory: Path, name: str, config: dict[str, Any]) -> Tracker:
    """The tracker of `kind` for the run in `directory` (named `name`, described by `config`)."""
    check(kind)
    if kind == "tensorboard":
        return TensorBoard(directory / "tb")
    if kind in ("wandb", "trackio"):
        return Service(importlib.import_module(kind), directory, name, config)
    return NoTracker()


def epoch_scalars(row: dict[str, float]) -> dict[str, float]:
    """A metrics.csv row as tracker tags, grouped the way TensorBoard shows them side by side."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        if key == "train_loss" or key.startswith("loss_"):
            out[f"loss/{key}"] = value
        elif key.endswith("_acc"):
            out[f"accuracy/{key}"] = value
        elif key in ("images_per_s", "epoch_time_s", "elapsed_s"):
            out[f"speed/{key}"] = value
        else:
            out[key] = value
    return out


class TensorBoard:
    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only the runs that track pay the import

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # an epoch is minutes: flushing each one costs nothing and survives a kill

    def close(self) -> None:
        self.writer.close()


class Service:
    """wandb or trackio (trackio mirrors wandb's init / log / finish)."""

    def __init__(self, module: Any, directory: Path, name: str, config: dict[str, Any]) -> None:
        self.module = module
        extra = {"dir": str(directory)} if module.__name__ == "wandb" else {}
        self.run = module.init(project=PROJECT, name=name, config=config, **extra)

    def log(self, values: dict[str, float], step: int) -> None:
        self.module.log(values, step=step)

    def close(self) -> None:
        self.module.finish()


class NoTracker:
    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass
