"""The layer tables of a configured model (common/layers/tables.py) and the cache's dataset names
(common/cache/reader.py `layer_name`)."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from common.layers import tables as layer_tables
from common.cache.reader import layer_name
from common.config import Config, ModelConfig, load_config
from common.layers.tables import layer_shapes, layer_infos_for, list_layers
from common.layers.hooks import layer_infos
from common.models import MODELS, create_model

# What a layer table reads from the data: the head's classes and the dummy input's shape.
DATA = SimpleNamespace(num_classes=10, in_channels=1, image_size=28)


def _config() -> Config:
    return load_config(None, ["teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125"])


def test_a_models_table_is_that_of_a_fresh_copy_built_for_the_data() -> None:
    cfg = _config()
    for spec in (cfg.teacher, cfg.student):
        model = create_model(spec.name, num_classes=10, in_channels=1, image_size=28, width=spec.width)
        assert list(layer_infos_for(spec, DATA)) == layer_infos(model, (1, 28, 28))


def test_the_student_table_needs_no_config_with_the_student_as_teacher() -> None:
    """Stage 2 and the study count the student's layers from its own spec; the same count the
    teacher-only listing gives when the student is put in the teacher's place."""
    cfg = _config()
    as_teacher = dataclasses.replace(cfg, teacher=cfg.student)
    assert len(layer_infos_for(cfg.student, DATA)) == len(list_layers(as_teacher, DATA))
    assert len(layer_infos_for(cfg.student, DATA)) != len(layer_infos_for(cfg.teacher, DATA))


def test_the_teacher_listing_and_shapes_come_from_the_teacher_table() -> None:
    cfg = _config()
    table = layer_infos_for(cfg.teacher, DATA)
    listing = list_layers(cfg, DATA)
    assert list(listing["layer"]) == [t.index for t in table]
    assert list(listing["module"]) == [t.path for t in table]
    assert set(listing.loc[listing["baseline"], "layer"]) == set(MODELS.get(cfg.teacher.name).baseline_layers)
    assert layer_shapes(cfg, DATA) == {t.index: t.shape for t in table}


def test_asking_for_a_table_leaves_the_seeded_rng_alone() -> None:
    layer_tables._layer_table.cache_clear()  # a cached table would not build a model at all
    torch.manual_seed(0)
    layer_infos_for(ModelConfig(name="resnet9", width=0.125), DATA)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_layer_dataset_names_are_the_file_formats() -> None:
    """Caches already on disk name teacher layer i's dataset so; a new name would orphan them."""
    assert [layer_name(i) for i in (0, 3, 15)] == ["layer_0", "layer_3", "layer_15"]
