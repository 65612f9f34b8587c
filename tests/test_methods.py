"""Methods: presets build and train on toy sequential models; the detached head (METHOD 8.1) holds;
projectors, pooling, reductions, SimKD's teacher-head copy, SemCKD's batch rule, resolve errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import MethodConfig, load_config
from common.errors import ConfigError, TrainingError
from common.layers.hooks import extract, generalized_layers, layer_infos, linearize, modules_after
from common.method_spec import SPEC_FIELDS, override_fields
from common.methods.base import Step
from common.methods import METHODS, build_distiller, resolve_method
from common.methods.projectors import PairAdapter, from_channels_first, to_channels_first
from common.registry import UnknownNameError

NUM_CLASSES, BATCH, INPUT = 10, 8, (3, 8, 8)
STUDENT_LAYERS, TEACHER_LAYERS = [0, 1], [1, 2]  # student 4x8x8, 8x4x4 ; teacher 16x4x4, 16x2x2


def toy_student() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # gen 0: 4x8x8
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # gen 1: 8x4x4
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # gen 2: 8x4x4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES),  # gen 3: 8
    )


def toy_teacher() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # gen 0: 8x8x8
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),  # gen 1: 16x4x4
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),  # gen 2: 16x2x2
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),  # gen 3: 16x2x2
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),  # gen 4: 16
    )


TEACHER_SHAPES = {info.index: info.shape for info in layer_infos(toy_teacher(), INPUT)}


# What the loop hands every method per batch: the batch's dataset rows and the 1-based epoch.
STEP = Step(torch.arange(BATCH), epoch=1)
PENULTIMATE = ([3], [4])  # student, teacher: the pooled vectors the heads read (crd's one pair)


def setup(name: str, student_layers=None, teacher_layers=None, batch_size=BATCH, **overrides):
    torch.manual_seed(0)
    spec = resolve_method(MethodConfig(name=name, **overrides))
    crd = spec.feature_loss == "crd"
    student_layers = student_layers or (PENULTIMATE[0] if crd else STUDENT_LAYERS)
    teacher_layers = teacher_layers or (PENULTIMATE[1] if crd else TEACHER_LAYERS)
    teacher, student = toy_teacher().eval(), toy_student()
    distiller = build_distiller(
        spec, student, num_classes=NUM_CLASSES, input_shape=INPUT, teacher_layers=list(teacher_layers),
        student_layers=list(student_layers), teacher_shapes=TEACHER_SHAPES, teacher=teacher, batch_size=batch_size,
        train_rows=torch.arange(BATCH), train_labels=torch.arange(BATCH) % NUM_CLASSES,
    )
    images, labels = torch.randn(batch_size, *INPUT), torch.randint(0, NUM_CLASSES, (batch_size,))
    with torch.no_grad():
        features = extract(teacher, images, list(teacher_layers))
        logits = teacher(images)
    return distiller, teacher, (images, labels, features, logits)


def split_student_parameters(student: nn.Module, deepest: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters up to and including generalized layer `deepest`, parameters after it)."""
    cut = generalized_layers(student)[deepest].position + 1
    modules = [m for _, m in linearize(student)]
    backbone = [p for m in modules[:cut] for p in m.parameters()]
    head = [p for m in modules[cut:] for p in m.parameters()]
    return backbone, head


def grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def reaches(loss: torch.Tensor, params: list[nn.Parameter]) -> bool:
    return any(g.abs().sum() > 0 for g in grads(loss, params))




# ----------------------------------------------------------------------------- the toys


def test_toy_models_are_sequential():
    assert len(generalized_layers(toy_student())) == 4 and len(generalized_layers(toy_teacher())) == 5
    model, x = toy_student().eval(), torch.randn(2, *INPUT)
    out = x
    for _, module in linearize(model):
        out = module(out)
    torch.testing.assert_close(out, model(x))


# ----------------------------------------------------------------------------- every preset


@pytest.mark.parametrize("name", METHODS.names())
def test_every_preset_trains_and_evaluates(name):
    distiller, teacher, (images, labels, features, teacher_logits) = setup(name)
    spec = distiller.spec
    logits, losses = distiller.forward_train(images, labels, features, teacher_logits, STEP)
    assert logits.shape == (BATCH, NUM_CLASSES)
    logit_term = "dkd" if spec.logit_loss == "dkd" else "kd"
    expected = {"ce"} | ({logit_term} if spec.kd_weight else set()) | ({"feat"} if spec.feature_loss != "none" else set())
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert spec.needs_teacher_logits == (spec.kd_weight > 0)
    assert distiller.teacher_layers == ([] if spec.feature_loss == "none" else PENULTIMATE[1] if spec.feature_loss == "crd" else TEACHER_LAYERS)
    distiller.eval()
    with torch.no_grad():
        assert distiller.forward_eval(images).shape == (BATCH, NUM_CLASSES)


@pytest.mark.parametrize("name", METHODS.names())
def test_teacher_parameters_are_never_distiller_parameters(name):
    distiller, teacher, _ = setup(name)
    own = {id(p) for p in distiller.parameters()}
    assert not own & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in distiller.student.parameters()} <= own


def test_preset_table():
    spec = {name: METHODS.get(name).spec for name in METHODS.names()}
    assert (spec["kd"].kd_weight, spec["kd"].kd_temperature, spec["kd"].kd_standardize) == (16.0, 4.0, False)
    assert spec["kd_std"].kd_standardize
    ours = spec["ours"]
    assert (ours.teacher_layers, ours.student_layers, ours.mapping, ours.projector) == (
        "selected", "baseline", "one2one", "conv1x1")
    assert ours.detach_head and ours.ce_weight == 1 and ours.kd_weight == 0 and ours.feature_loss == "mse"
    assert not spec["ours+ce"].detach_head and spec["ours+ce"].kd_weight == 0
    assert not spec["ours+ce+kd"].detach_head and spec["ours+ce+kd"].kd_weight == 16
    assert [spec[n].teacher_layers for n in ("ours_s", "ours_i", "ours_e", "ours_sqrtie")] == ["S", "I", "E", "sqrtIE"]
    assert all(spec[n].detach_head for n in ("ours_s", "ours_i", "ours_e", "ours_sqrtie", "stl_seplin"))
    assert spec["fitnet"].kd_weight == 16 and spec["fitnet_nokd"].kd_weight == 0
    assert spec["fitnet_fc"].mapping == "full" and spec["sp"].projector == "none"
    assert spec["simkd"].teacher_head and spec["simkd"].projector == "three_layer"
    assert spec["semckd"].mapping == "full" and spec["semckd"].projector == "three_layer"
    # sp as published (Tung & Mori: CE + 3000 x SP, no KD); sp_ref as the paper's "Sim. Pres."
    assert (spec["sp"].feature_loss, spec["sp"].feature_weight, spec["sp"].kd_weight, spec["sp"].ce_weight) == ("sp", 3000.0, 0.0, 1.0)
    assert (spec["sp_ref"].feature_loss, spec["sp_ref"].feature_weight, spec["sp_ref"].kd_weight) == ("sp_ref", 1.0, 16.0)
    assert spec["sp_ref"].projector == "none"
    for name in ("fitnet", "fitnet_nokd", "fitnet_fc", "sp", "sp_ref", "simkd", "semckd", "stl_seplin"):
        assert spec[name].teacher_layers == "baseline" and spec[name].student_layers == "baseline"


# ----------------------------------------------------------------------------- detached head (8.1)

DETACHED = [n for n in METHODS.names() if METHODS.get(n).spec.detach_head]


def test_detached_presets_are_ours_and_stl_seplin():
    assert set(DETACHED) == {"ours", "ours_s", "ours_i", "ours_e", "ours_sqrtie", "stl_seplin"}


@pytest.mark.parametrize("name", DETACHED)
@pytest.mark.parametrize("kd_weight", [None, 16.0])
def test_no_logit_loss_reaches_the_backbone(name, kd_weight):
    distiller, _, (images, labels, features, teacher_logits) = setup(name, kd_weight=kd_weight)
    _, losses = distiller.forward_train(images, labels, features, teacher_logits)
    backbone, head = split_student_parameters(distiller.student, max(STUDENT_LAYERS))
    assert backbone and head
    for key in [k for k in losses if k != "feat"]:  # ce, and kd when switched on
        assert not reaches(losses[key], backbone), f"{key} reaches the backbone"
        assert reaches(losses[key], head), f"{key} does not train the head"
    assert all(g.abs().sum() > 0 for g in grads(losses["ce"], head))  # every head parameter
    assert reaches(losses["feat"], backbone)
    assert not reaches(losses["feat"], head)
    # and with the total loss: backbone gradients are exactly the feature loss's
    total = sum(losses.values())
    for g_total, g_feat in zip(grads(total, backbone), grads(losses["feat"], backbone)):
        torch.testing.assert_close(g_total, g_feat)


@pytest.mark.parametrize("name,key", [("ours+ce", "ce"), ("ours+ce+kd", "ce"), ("ours+ce+kd", "kd"), ("fitnet", "ce")])
def test_without_detach_logit_losses_reach_the_backbone(name, key):
    distiller, _, (images, labels, features, teacher_logits) = setup(name)
    _, losses = distiller.forward_train(images, labels, features, teacher_logits)
    backbone, _ = split_student_parameters(distiller.student, max(STUDENT_LAYERS))
    assert reaches(losses[key], backbone)


def test_detached_forward_gives_the_same_logits():
    distiller, _, (images, labels, features, teacher_logits) = setup("ours")
    distiller.eval()
    with torch.no_grad():
        logits, _ = distiller.forward_train(images, labels, features, teacher_logits)
        torch.testing.assert_close(logits, distiller.student(images))
        torch.testing.assert_close(distiller.forward_eval(images), distiller.student(images))


# ----------------------------------------------------------------------------- projectors and pooling (8.2)


@pytest.mark.parametrize("name", ["ours", "fitnet", "fitnet_fc", "stl_seplin"])
def test_projectors_are_bias_free_1x1_convs_student_to_teacher(name):
    distiller, _, _ = setup(name)
    term = distiller.feature_term
    assert len(term.adapters) == len(term.pairs) == (4 if name == "fitnet_fc" else 2)
    for pair, adapter in zip(term.pairs, term.adapters):
        conv = adapter.projector
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.in_channels == layer_infos(toy_student(), INPUT)[STUDENT_LAYERS[pair.student]].shape[0]
        assert conv.out_channels == TEACHER_SHAPES[TEACHER_LAYERS[pair.teacher]][0]


@pytest.mark.parametrize("name", ["simkd", "semckd"])
def test_three_layer_projectors(name):
    distiller, _, _ = setup(name)
    for adapter in distiller.feature_term.adapters:
        kinds = [type(m) for m in adapter.projector]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
        convs = [m for m in adapter.projector if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)] and all(c.bias is None for c in convs)
        assert convs[0].out_channels == 2 * convs[-1].out_channels


def manual_pair_loss(distiller, slot, student_feature, teacher_feature, pooled):
    conv = distiller.feature_term.adapters[slot].projector
    if pooled == "student":
        student_feature = F.adaptive_avg_pool2d(student_feature, teacher_feature.shape[2:])
    else:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, student_feature.shape[2:])
    return (conv(student_feature) - teacher_feature).pow(2).mean()


@pytest.mark.parametrize(
    "student_layer,teacher_layer,pooled,pred_size",
    [(0, 1, "student", (4, 4)), (1, 0, "teacher", (4, 4)), (1, 1, "teacher", (4, 4)), (2, 3, "student", (2, 2))],
)
def test_pooling_rule_and_single_pair_loss(student_layer, teacher_layer, pooled, pred_size):
    distiller, _, (images, labels, features, teacher_logits) = setup(
        "ours", student_layers=[student_layer], teacher_layers=[teacher_layer])
    adapter = distiller.feature_term.adapters[0]
    assert adapter.pooled == pooled
    student_feature = extract(distiller.student, images, [student_layer])[student_layer]
    prediction, _ = adapter(student_feature, features[teacher_layer])
    assert tuple(prediction.shape[2:]) == pred_size
    _, losses = distiller.forward_train(images, labels, features, teacher_logits)
    with torch.no_grad():
        expected = manual_pair_loss(distiller, 0, student_feature, features[teacher_layer], pooled)
    torch.testing.assert_close(losses["feat"].detach(), expected)


def test_one2one_loss_is_the_mean_over_pairs_and_full_the_mean_over_all_pairs():
    for name, pairs in [("fitnet_nokd", [(0, 0), (1, 1)]), ("fitnet_fc", [(0, 0), (0, 1), (1, 0), (1, 1)])]:
        distiller, _, (images, labels, features, teacher_logits) = setup(name, feature_weight=2.0)
        _, losses = distiller.forward_train(images, labels, features, teacher_logits)
        student = extract(distiller.student, images, STUDENT_LAYERS)
        with torch.no_grad():
            manual = [
                manual_pair_loss(distiller, slot, student[STUDENT_LAYERS[s]], features[TEACHER_LAYERS[t]], "student")
                for slot, (s, t) in enumerate(pairs)
            ]
        torch.testing.assert_close(losses["feat"].detach(), 2.0 * torch.stack(manual).mean())


def test_sp_sums_the_published_loss_over_pairs_and_sp_ref_averages_the_reference_loss():
    from common.methods.losses import similarity_preserving_loss, similarity_preserving_ref_loss

    for name, loss, reduce in [("sp", similarity_preserving_loss, torch.sum), ("sp_ref", similarity_preserving_ref_loss, torch.mean)]:
        distiller, _, (images, labels, features, teacher_logits) = setup(name)
        _, losses = distiller.forward_train(images, labels, features, teacher_logits)
        student = extract(distiller.student, images, STUDENT_LAYERS)
        with torch.no_grad():
            pairs = torch.stack([loss(student[s], features[t]) for s, t in zip(STUDENT_LAYERS, TEACHER_LAYERS)])
        weight = METHODS.get(name).spec.feature_weight
        torch.testing.assert_close(losses["feat"].detach(), weight * reduce(pairs))
        assert ("kd" in losses) == (name == "sp_ref")


def test_mixed_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="pooling"):
        PairAdapter((4, 8, 2), (4, 4, 4), "conv1x1", "student layer 1 / teacher layer 2")


def test_projector_none_needs_equal_channels():
    with pytest.raises(ConfigError, match="projector=none"):
        PairAdapter((4, 4, 4), (8, 4, 4), "none", "pair")
    assert isinstance(PairAdapter((8, 4, 4), (8, 2, 2), "none", "pair").projector, nn.Identity)


def test_token_and_vector_layouts():
    tokens = PairAdapter((5, 6), (5, 12), "conv1x1", "vit pair")  # (T, D) features: 1-D mode
    assert isinstance(tokens.projector, nn.Conv1d) and tokens.projector.kernel_size == (1,)
    student, teacher = torch.randn(3, 5, 6), torch.randn(3, 5, 12)
    prediction, target = tokens(student, teacher)
    assert prediction.shape == (3, 12, 5)
    torch.testing.assert_close(target, teacher.transpose(1, 2))  # tokens kept in order, D = channels
    torch.testing.assert_close(from_channels_first(prediction, (5, 12)), prediction.transpose(1, 2))
    vector = PairAdapter((8,), (16,), "conv1x1", "flatten pair")
    assert isinstance(vector.projector, nn.Conv2d)
    assert vector(torch.randn(3, 8), torch.randn(3, 16))[0].shape == (3, 16, 1, 1)
    mixed = PairAdapter((4, 2, 2), (6, 12), "conv1x1", "cnn/vit pair")  # CNN map in 1-D mode: (C, H*W)
    assert isinstance(mixed.projector, nn.Conv1d)
    assert mixed(torch.randn(3, 4, 2, 2), torch.randn(3, 6, 12))[0].shape == (3, 12, 4)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(to_channels_first(x, 1), x.reshape(2, 4, 9))


# ----------------------------------------------------------------------------- SimKD


def test_simkd_head_copy_starts_after_the_last_teacher_layer():
    distiller, teacher, _ = setup("simkd")
    expected = list(modules_after(teacher, TEACHER_LAYERS[-1]))
    copy = list(distiller.teacher_head)
    assert [type(m) for m in copy] == [type(m) for m in expected] == [
        nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert copy[0].in_channels == 16  # gen layer 3's conv, not a second pass through layer 2's ReLU
    for mine, theirs in zip(distiller.teacher_head.parameters(), nn.Sequential(*expected).parameters()):
        assert mine is not theirs and mine.requires_grad
        torch.testing.assert_close(mine, theirs)


def test_simkd_trains_and_evaluates_through_the_teacher_head():
    distiller, teacher, (images, labels, features, teacher_logits) = setup("simkd")
    logits, losses = distiller.forward_train(images, labels, features, teacher_logits)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.teacher_head.parameters())
    assert all(p.grad is None for p in distiller.student[-1].parameters())  # the student's own head is unused
    distiller.eval()
    # the student map (8x4x4) is larger than the teacher's (16x2x2): pooled before the projector
    assert distiller.feature_term.adapters[-1].pooled == "student"
    with torch.no_grad():
        h = extract(distiller.student, images, STUDENT_LAYERS)[STUDENT_LAYERS[-1]]
        manual = distiller.teacher_head(distiller.feature_term.adapters[-1].projector(F.adaptive_avg_pool2d(h, (2, 2))))
        before = distiller.forward_eval(images)
        torch.testing.assert_close(before, manual)
        assert not torch.allclose(before, distiller.student(images))
        distiller.student[-1].weight.add_(1.0)  # changing the student's own head changes nothing
        torch.testing.assert_close(distiller.forward_eval(images), before)
        distiller.teacher_head[-1].bias.add_(1.0)
        torch.testing.assert_close(distiller.forward_eval(images), before + 1.0)


def test_simkd_needs_the_teacher():
    spec = resolve_method(MethodConfig(name="simkd"))
    with pytest.raises(ValueError, match="teacher"):
        build_distiller(spec, toy_student(), num_classes=NUM_CLASSES, input_shape=INPUT, teacher_layers=TEACHER_LAYERS,
                        student_layers=STUDENT_LAYERS, teacher_shapes=TEACHER_SHAPES)


def test_simkd_head_with_wrong_classes_is_a_config_error():
    spec = resolve_method(MethodConfig(name="simkd"))
    with pytest.raises(ConfigError, match="logits"):
        build_distiller(spec, toy_student(), num_classes=7, input_shape=INPUT, teacher_layers=TEACHER_LAYERS,
                        student_layers=STUDENT_LAYERS, teacher_shapes=TEACHER_SHAPES, teacher=toy_teacher())


# ----------------------------------------------------------------------------- SemCKD


def test_semckd_attention_is_learned_and_batch_size_is_fixed():
    distiller, _, (images, labels, features, teacher_logits) = setup("semckd")
    term = distiller.feature_term
    assert len(term.adapters) == 4 and len(term.queries) == 2 and len(term.keys) == 2
    assert term.queries[0][0].in_features == BATCH
    student = extract(distiller.student, images, STUDENT_LAYERS)
    weights = term.attention([student[i] for i in STUDENT_LAYERS], [features[i] for i in TEACHER_LAYERS])
    assert weights.shape == (BATCH, 2, 2)
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(BATCH, 2))
    _, losses = distiller.forward_train(images, labels, features, teacher_logits)
    losses["feat"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.queries[0].parameters())
    with pytest.raises(TrainingError, match="drop"):
        distiller.forward_train(images[:5], labels[:5], {k: v[:5] for k, v in features.items()}, teacher_logits[:5])
    distiller.eval()
    with torch.no_grad():
        assert distiller.forward_eval(images[:3]).shape == (3, NUM_CLASSES)  # eval batches may be any size


def test_semckd_needs_the_batch_size():
    with pytest.raises(ConfigError, match="batch"):
        setup("semckd", batch_size=None)


# ----------------------------------------------------------------------------- resolve / build errors


def test_resolve_method_applies_overrides_without_touching_the_preset():
    spec = resolve_method(MethodConfig(name="ours", mapping="full", teacher_layers=[3, 5], kd_weight=2.0))
    assert (spec.mapping, spec.teacher_layers, spec.kd_weight) == ("full", (3, 5), 2.0)
    assert resolve_method(MethodConfig(name="ours", teacher_layers="E")).teacher_layers == "E"
    assert spec.detach_head and spec.name == "ours"
    preset = METHODS.get("ours").spec
    assert (preset.mapping, preset.teacher_layers, preset.kd_weight) == ("one2one", "selected", 0.0)
    assert resolve_method(MethodConfig(name="fitnet")) == METHODS.get("fitnet").spec


def _other_values(key: str, preset_value: object) -> list[object]:
    """Values of `key` to try as an override of the `ours` preset: a changed bool or number,
    then every other preset's value, then the preset's own (always valid)."""
    values: list[object] = []
    if isinstance(preset_value, bool):
        values.append(not preset_value)
    elif isinstance(preset_value, float):
        values.append(preset_value + 1.0)
    values += [getattr(METHODS.get(name).spec, key) for name in METHODS.names()]
    return [v for v in values if v != preset_value] + [preset_value]


def test_every_method_hyperparameter_is_a_config_override():
    """MethodConfig is derived from MethodSpec (issue 12): each MethodSpec field but the name and the
    PRESET_ONLY ones is a `method.<key>=...` override that reaches the resolved spec, and no other
    method key exists, so a new hyperparameter needs no second declaration in config.py."""
    keys = [f.name for f in override_fields()]
    assert [f.name for f in dataclasses.fields(MethodConfig)] == ["name", *keys]
    assert set(SPEC_FIELDS) - set(keys) == {"name", "feature_loss", "teacher_head", "logit_loss"}
    ours = METHODS.get("ours").spec
    for key in keys:
        for value in _other_values(key, getattr(ours, key)):
            as_config = list(value) if isinstance(value, tuple) else value
            cfg = load_config(None, ["method.name=ours", f"method.{key}={json.dumps(as_config)}"])
            assert getattr(cfg.method, key) == as_config, key
            try:
                spec = resolve_method(cfg.method)
            except ConfigError:  # valid for its own preset, not for ours (e.g. an empty layer list)
                continue
            assert getattr(spec, key) == value, key
            break
        else:
            pytest.fail(f"method.{key}: no value resolves, not even the preset's own")


@pytest.mark.parametrize("key,value", [("feature_loss", "sp"), ("teacher_head", "true")])
def test_preset_only_fields_are_not_config_keys(key, value):
    with pytest.raises(ConfigError, match=f"unknown config key 'method.{key}'"):
        load_config(None, [f"method.{key}={value}"])


def test_unknown_method_lists_the_names():
    with pytest.raises(UnknownNameError, match="ours"):
        resolve_method(MethodConfig(name="ourz"))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"mapping": "many"}, "method.mapping.*one2one"),
        ({"projector": "mlp"}, "method.projector.*conv1x1"),
        ({"teacher_layers": "best"}, "method.teacher_layers.*sqrtIE"),
        ({"student_layers": "selected"}, "method.student_layers"),
        ({"kd_weight": -1.0}, "method.kd_weight"),
        ({"kd_temperature": 0.0}, "method.kd_temperature"),
        ({"feature_weight": 0.0}, "detach_head"),
    ],
)
def test_bad_values_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_method(MethodConfig(name="ours", **overrides))


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        ("ce", {"teacher_layers": [1, 2]}, "no effect"),
        ("kd", {"detach_head": True}, "feature loss"),
        ("sp", {"projector": "conv1x1"}, "projector must be none"),
        ("sp_ref", {"projector": "conv1x1"}, "projector must be none"),
        ("semckd", {"mapping": "one2one"}, "mapping must be full"),
        ("simkd", {"detach_head": True}, "detach_head"),
        ("ce", {"ce_weight": 0.0}, "every loss weight"),
    ],
)
def test_inconsistent_overrides_are_config_errors(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_method(MethodConfig(name=name, **overrides))


def test_one2one_needs_equally_many_layers():
    with pytest.raises(ConfigError, match="one2one"):
        setup("ours", student_layers=[0, 1], teacher_layers=[1, 2, 3])
    distiller, _, _ = setup("fitnet_fc", student_layers=[0, 1], teacher_layers=[1, 2, 3])
    assert len(distiller.feature_term.adapters) == 6


def test_kd_methods_need_teacher_logits():
    distiller, _, (images, labels, features, _) = setup("kd")
    assert distiller.spec.needs_teacher_logits and distiller.teacher_layers == []
    with pytest.raises(ValueError, match="teacher_logits"):
        distiller.forward_train(images, labels, features, None)
    ce, _, (images, labels, _, _) = setup("ce")
    assert not ce.spec.needs_teacher_logits and not ce.spec.needs_teacher
    _, losses = ce.forward_train(images, labels, {}, None)
    assert set(losses) == {"ce"}


def test_hyperparameters_added_later_leave_earlier_runs_hashes_alone():
    # Run directories hash the resolved spec; the DKD/CRD fields came after runs existed, so at
    # the values those runs had they are left out and every earlier preset hashes as before.
    from common.method_spec import hashed_fields

    added = {"logit_loss", "dkd_alpha", "dkd_beta", "dkd_warmup", "crd_negatives"}
    for name in METHODS.names():
        spec = METHODS.get(name).spec
        kept = set(hashed_fields(spec))
        if name == "dkd":
            assert {"logit_loss"} <= kept, name  # its own setting enters the hash
        else:  # crd is told apart by its feature_loss; its bank size is at the default
            assert kept == set(SPEC_FIELDS) - added, name
    changed = hashed_fields(resolve_method(MethodConfig(name="kd", crd_negatives=10)))
    assert changed["crd_negatives"] == 10  # a non-default value is part of the run's identity
