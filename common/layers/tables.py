"""The generalized layers (METHOD 4) of a configured model, teacher or student, on a dataset:
index, module path, kind and per-sample output shape, from one dummy forward of an untrained copy."""
from __future__ import annotations

import functools
from typing import Protocol

import pandas as pd
import torch

from common.config import Config, ModelConfig
from common.data.registry import Data
from common.layers.hooks import LayerInfo, layer_infos
from common.models import MODELS, create_model


class DataShape(Protocol):
    """What a layer table reads of a dataset: a `Data`, or its shape known before it is read
    (`common.checks.shape_before_data`)."""

    num_classes: int
    in_channels: int
    image_size: int


def layer_infos_for(model: ModelConfig, data: DataShape) -> tuple[LayerInfo, ...]:
    """The generalized layers of `model` (cfg.teacher or cfg.student) built for `data`'s classes,
    channels and image size, with their shapes."""
    return _layer_table(model.name, model.width, data.num_classes, data.in_channels, data.image_size)


def list_layers(cfg: Config, data: Data) -> pd.DataFrame:
    """Index, module path, output shape and bytes per sample of each generalized layer of the
    teacher (METHOD 4): stage 1's --list-layers and the first columns of layer_stats.csv."""
    table = layer_infos_for(cfg.teacher, data)
    baseline = set(MODELS.get(cfg.teacher.name).baseline_layers)
    return pd.DataFrame(
        {
            "layer": t.index,
            "module": t.path,
            "kind": t.kind,
            "shape": "x".join(map(str, t.shape)),
            "dim": t.dim,
            "bytes_per_sample": t.bytes_per_sample,
            "baseline": t.index in baseline,
        }
        for t in table
    )


def layer_shapes(cfg: Config, data: Data) -> dict[int, tuple[int, ...]]:
    """Per-sample output shape of every teacher generalized layer."""
    return {t.index: t.shape for t in layer_infos_for(cfg.teacher, data)}


@functools.lru_cache(maxsize=16)
def _layer_table(name: str, width: float, num_classes: int, in_channels: int, image_size: int) -> tuple[LayerInfo, ...]:
    """Cached: a stage asks for the table several times (validation, S/I/E/Q, the cache, the
    manifest), and a full-width model costs a build and a forward each time. The build draws
    its random init from a forked RNG, so asking never changes a seeded run."""
    with torch.random.fork_rng(devices=[]):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
        return tuple(layer_infos(model, (in_channels, image_size, image_size)))
