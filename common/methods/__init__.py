"""Distillation methods (METHOD 8, 9): presets, resolution of a config, and the Distiller factory.

    spec = resolve_method(cfg.method)               # preset + overrides, validated
    # the caller resolves spec.teacher_layers (a word, through stage 1's manifest) and
    # spec.student_layers ("baseline") to indices, then:
    distiller = build_distiller(spec, student, num_classes=..., input_shape=..., teacher_layers=[...],
                                student_layers=[...], teacher_shapes={...}, teacher=..., batch_size=...)
    logits, losses = distiller.forward_train(images, labels, teacher_features, teacher_logits)
    sum(losses.values()).backward()

Presets (METHODS.names(); `stage2_distill.py --list-methods` prints each with its summary):
ce, kd, kd_std, fitnet, fitnet_nokd, fitnet_fc, sp, sp_ref, simkd, semckd, stl_seplin, ours,
ours+ce, ours+ce+kd, ours_s, ours_i, ours_e, ours_sqrtie. `sp` is the published
similarity-preserving loss (Tung & Mori 2019, weight 3000, no KD); `sp_ref` is the reference's
variant that the paper's "Sim. Pres." bars were trained with (cosine matrices, weight 1, + KD).
One module per family: ce.py, kd.py, feature.py (FitNet family, ours, ablations), sp.py,
simkd.py, semckd.py; shared pieces in base.py and projectors.py; formulas in common/methods/losses.py;
the hyperparameters in MethodSpec (common/method_spec.py), from which config.py derives the
`method:` section, so every MethodSpec field but the PRESET_ONLY ones is a `method.<key>=` override.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.config import Config, MethodConfig
from common.errors import ConfigError
from common.layers.hooks import generalized_layers, layer_infos, resolve_layers
from common.method_spec import MethodSpec
from common.methods import ce, crd, dkd, feature, kd, semckd, simkd, sp  # noqa: F401  (registers the presets)
from common.methods.base import (
    FEATURE_LOSSES,
    MAPPINGS,
    METHODS,
    BuildContext,
    Distiller,
    FeatureContext,
    MethodPreset,
    validate_spec,
)
from common.methods.dkd_loss import dkd_beta
from common.methods.projectors import PROJECTORS

__all__ = [
    "FEATURE_LOSSES", "MAPPINGS", "METHODS", "PROJECTORS", "Distiller", "MethodPreset",
    "build_distiller", "resolve_method", "resolve_run_method",
]


def resolve_method(cfg: MethodConfig) -> MethodSpec:
    """The preset `cfg.name` with every non-None field of `cfg` overriding it, validated.

    Unknown name: UnknownNameError listing the presets. Bad value: ConfigError naming the key
    and the allowed values. Layer lists become tuples of ints. Every field of `cfg` but the name
    is a MethodSpec field, since config.py derives MethodConfig from MethodSpec.
    """
    preset = METHODS.get(cfg.name).spec
    overrides: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "name" or value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        overrides[f.name] = value
    spec = dataclasses.replace(preset, **overrides)
    validate_spec(spec)
    return spec


def resolve_run_method(cfg: Config) -> MethodSpec:
    """`resolve_method(cfg.method)` with the values that depend on the teacher/student pair filled
    in, as stage 2 trains and hashes it: DKD's beta, when not set, is the DKD paper's for the pair
    (`dkd_loss.dkd_beta`, 8 for pairs it did not run)."""
    spec = resolve_method(cfg.method)
    if spec.logit_loss == "dkd" and spec.dkd_beta is None:
        spec = dataclasses.replace(spec, dkd_beta=dkd_beta(cfg.teacher.name, cfg.student.name))
    return spec


def build_distiller(
    spec: MethodSpec,
    student: nn.Module,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    teacher_layers: list[int],
    student_layers: list[int],
    teacher_shapes: dict[int, tuple[int, ...]],
    teacher: nn.Module | None = None,
    batch_size: int | None = None,
    train_rows: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
) -> Distiller:
    """The Distiller running `spec` on `student`, on the student's device.

    teacher_layers / student_layers: resolved generalized-layer indices (ignored, and may be
    empty, for methods without a feature loss). teacher_shapes: per-sample shape of each teacher
    layer's feature ((C,H,W), (D,) or ViT (T,D)). teacher: only for SimKD (its head modules are
    copied; the teacher itself is never registered). batch_size: the training batch size, needed
    by semckd (its attention MLPs take a Gram row of that width; train with drop_last).
    train_rows / train_labels: the dataset indices of the training rows and the labels of the whole
    training split, needed by crd (its memory bank holds one entry per training row).
    """
    validate_spec(spec)
    preset = METHODS.get(spec.name)
    has_features = spec.feature_loss != "none"
    if has_features:
        if not teacher_layers or not student_layers:
            raise ConfigError(f"method '{spec.name}' distils features: it needs teacher and student layers")
        student_layers = resolve_layers(student_layers, len(generalized_layers(student)), "student layer")
        missing = [i for i in teacher_layers if i not in teacher_shapes]
        if missing:
            raise ValueError(f"teacher_shapes lacks layers {missing}")
        table = layer_infos(student, input_shape)
        student_shapes = [tuple(table[i].shape) for i in student_layers]
        teacher_shapes_list = [tuple(teacher_shapes[i]) for i in teacher_layers]
    else:
        student_layers, teacher_layers, student_shapes, teacher_shapes_list = [], [], [], []
    context = BuildContext(
        num_classes=num_classes, input_shape=tuple(input_shape), student_layers=list(student_layers),
        teacher_layers=list(teacher_layers), student_shapes=student_shapes, teacher_shapes=teacher_shapes_list,
        teacher=teacher if spec.teacher_head else None, batch_size=batch_size,
        train_rows=train_rows, train_labels=train_labels,
    )
    feature_term = None
    if has_features:
        pairs = MAPPINGS[spec.mapping](len(student_layers), len(teacher_layers))
        feature_term = FEATURE_LOSSES.get(spec.feature_loss)(
            FeatureContext(spec, context.student_layers, context.teacher_layers, student_shapes, teacher_shapes_list, pairs, batch_size,
                           train_rows, train_labels)
        )
    device = next(student.parameters()).device
    if feature_term is not None:
        feature_term.to(device)
    return preset.distiller(spec, student, feature_term, context).to(device)
