"""Bring your own model: torchvision / timm classifiers by name (`tv:` / `timm:`), built without
weights at CIFAR size; their generalized layers, S/I/E/Q, the logit-free step with its detached
head (as student and as teacher), local checkpoints (state dict, safetensors) and the errors."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from common.config import MethodConfig
from common.errors import ConfigError
from common.layers.hooks import backbone_and_head_parameters, extract, generalized_layers, head_position, layer_infos, linearize, modules_after
from common.methods import build_distiller, resolve_method
from common.models import MODELS, create_model
from common.models.external import adapt_input_weight, baseline_layers, describe
from common.quality.formulas import layer_stats
from common.registry import UnknownNameError

NUM_CLASSES, SIZE = 10, 32


def _repeat(*groups: tuple[int, str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(path.format(i), shape) for count, path, shape in groups for i in range(count)]


# name -> (input channels, [(module path, per-sample shape)] at 32x32, baseline, head item, family)
MODELS_UNDER_TEST = {
    "tv:resnet18": (
        1,
        [("maxpool", (64, 8, 8))] + _repeat(
            (2, "layer1.{}", (64, 8, 8)), (2, "layer2.{}", (128, 4, 4)), (2, "layer3.{}", (256, 2, 2)), (2, "layer4.{}", (512, 1, 1))
        ),
        (2, 4, 6, 8), "fc", "cnn",
    ),
    "timm:convnext_atto": (
        3,
        [("stem", (40, 8, 8))] + _repeat(
            (2, "stages.0.blocks.{}", (40, 8, 8)), (2, "stages.1.blocks.{}", (80, 4, 4)),
            (6, "stages.2.blocks.{}", (160, 2, 2)), (2, "stages.3.blocks.{}", (320, 1, 1)),
        ),
        (2, 4, 10, 12), "head", "cnn",
    ),
    # patch 16 at 32 px: 2x2 patches + the class token
    "timm:deit_tiny_patch16_224": (3, _repeat((12, "blocks.{}", (5, 192))), (2, 5, 8, 11), "head", "vit"),
}
NAMES = sorted(MODELS_UNDER_TEST)


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        name: create_model(name, num_classes=NUM_CLASSES, in_channels=MODELS_UNDER_TEST[name][0], image_size=SIZE)
        for name in NAMES
    }


def _images(name: str, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, MODELS_UNDER_TEST[name][0], SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("name", NAMES)
def test_layer_listing_spec_and_head(name, built):
    channels, expected, baseline, head, family = MODELS_UNDER_TEST[name]
    model = built[name]
    table = layer_infos(model, (channels, SIZE, SIZE))
    assert [t.index for t in table] == list(range(len(expected)))
    assert [(t.path, t.shape) for t in table] == expected
    spec = MODELS.get(name)
    assert (spec.baseline_layers, spec.family, spec.lr_ce, spec.lr_kd) == (baseline, family, 0.01, 0.01)
    assert spec.library == ("torchvision" if name.startswith("tv:") else "timm")
    assert len(describe(name).shapes) == len(table)  # the spec's default-size view has the same layers
    assert linearize(model)[head_position(model)][0] == head
    backbone, head_params = backbone_and_head_parameters(model)  # the pretrained teacher's two LR groups
    assert {id(p) for p in head_params} == {id(p) for p in linearize(model)[head_position(model)][1].parameters()}
    assert len(backbone) + len(head_params) == len(list(model.parameters()))
    assert name not in MODELS.names()  # the registry's own list stays the paper's models


@pytest.mark.parametrize("name", NAMES)
def test_chain_replays_the_forward_and_each_layer_runs_once(name, built):
    model = built[name].eval()
    x = _images(name, 2)
    calls: collections.Counter[str] = collections.Counter()
    gen = generalized_layers(model)
    handles = [g.module.register_forward_hook(lambda *_, p=g.path: calls.update([p])) for g in gen]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == collections.Counter(g.path for g in gen)
    with torch.no_grad():
        out = x
        for _, module in linearize(model):
            out = module(out)
        torch.testing.assert_close(out, logits)
        features = extract(model, x, [len(gen) - 1])
        torch.testing.assert_close(modules_after(model, len(gen) - 1)(features[len(gen) - 1]), logits)
    copied = copy.deepcopy(model)  # the chain follows the copy, not the original
    assert all(a is not b for (_, a), (_, b) in zip(linearize(copied), linearize(model)))
    assert generalized_layers(copied)[0].module is copied.get_submodule(gen[0].path)


@pytest.mark.parametrize("name", NAMES)
def test_quality_on_a_tiny_set(name, built):
    model = built[name].eval()
    labels = torch.arange(3).repeat_interleave(6)
    layers = [g.index for g in generalized_layers(model)]
    features = extract(model, _images(name, len(labels), seed=1), layers)
    for layer in (layers[0], layers[len(layers) // 2], layers[-1]):
        stats = layer_stats(features[layer], labels, features[layer], labels, n_train=len(labels))
        assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("S", "I", "E", "Q")), (layer, stats)


def test_baseline_rule():
    maps = [(8, 16, 16)] + [(8, 16, 16)] * 2 + [(16, 8, 8)] * 2 + [(32, 4, 4)] * 3 + [(64, 2, 2)] * 2 + [(64, 1, 1)]
    assert baseline_layers(tuple(maps), first_block=1) == (4, 7, 9, 10)  # last block of the last four resolutions
    assert baseline_layers(tuple([(65, 64)] * 12), first_block=0) == (2, 5, 8, 11)  # ViT: quarters of the depth
    assert baseline_layers(tuple([(8, 4, 4)] * 3), first_block=0) == (0, 1, 2)


# ----------------------------------------------------------------------------- distillation


def _grads_reach(loss: torch.Tensor, params: list[nn.Parameter]) -> bool:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def _split_after(model: nn.Module, layer: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters up to generalized layer `layer`, parameters of the modules after it)."""
    after = {id(p) for _, m in linearize(model)[generalized_layers(model)[layer].position + 1 :] for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in after], [p for p in model.parameters() if id(p) in after]


def _step(teacher: nn.Module, student: nn.Module, t_name: str, s_name: str, t_channels: int, method: str = "ours"):
    spec = resolve_method(MethodConfig(name=method))
    t_layers, s_layers = list(MODELS.get(t_name).baseline_layers), list(MODELS.get(s_name).baseline_layers)
    input_shape = (t_channels, SIZE, SIZE)
    teacher_shapes = {t.index: t.shape for t in layer_infos(teacher, input_shape)}
    distiller = build_distiller(
        spec, student, num_classes=NUM_CLASSES, input_shape=input_shape, teacher_layers=t_layers,
        student_layers=s_layers, teacher_shapes=teacher_shapes, teacher=teacher, batch_size=4,
    )
    images = torch.randn(4, *input_shape)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        features = extract(teacher.eval(), images, t_layers)
        teacher_logits = teacher(images)
    logits, losses = distiller.train().forward_train(images, labels, features, teacher_logits)
    assert logits.shape == (4, NUM_CLASSES) and all(torch.isfinite(v) for v in losses.values())
    return distiller, losses, max(s_layers)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_logit_free_step_detaches_the_head(name, role, built):
    """METHOD 8.1 on a library model: CE trains only what follows the deepest distilled student
    layer (pooling + classifier), the feature loss only what precedes it."""
    channels = MODELS_UNDER_TEST[name][0]
    other = create_model("resnet9" if role == "teacher" else "resnet18", num_classes=NUM_CLASSES, in_channels=channels, width=0.125)
    external = copy.deepcopy(built[name])
    if role == "student":
        teacher, student, t_name, s_name = other.eval(), external, "resnet18", name
    else:
        teacher, student, t_name, s_name = external.eval(), other, name, "resnet9"
    distiller, losses, deepest = _step(teacher, student, t_name, s_name, channels)
    backbone, head = _split_after(distiller.student, deepest)
    assert backbone and head
    assert not _grads_reach(losses["ce"], backbone) and _grads_reach(losses["ce"], head)
    assert _grads_reach(losses["feat"], backbone) and not _grads_reach(losses["feat"], head)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_simkd_reuses_a_library_teachers_head(built):
    teacher = copy.deepcopy(built["timm:deit_tiny_patch16_224"]).eval()
    student = create_model("resnet9", num_classes=NUM_CLASSES, width=0.125)
    distiller, losses, _ = _step(teacher, student, "timm:deit_tiny_patch16_224", "resnet9", 3, method="simkd")
    assert set(losses) == {"ce", "kd", "feat"}
    own = {id(p) for p in distiller.parameters()}
    assert not own & {id(p) for p in teacher.parameters()}
    assert [type(m).__name__ for m in distiller.teacher_head][:2] == ["LayerNorm", "Glue"]


# ----------------------------------------------------------------------------- checkpoints


def test_state_dict_checkpoint_round_trip(tmp_path):
    """Nested under "state_dict" with DDP's "module." prefix; a 3-channel, 10-class file into a
    1-channel, 5-class model: the stem kernel summed over RGB, the classifier left fresh."""
    source = create_model("tv:resnet18", num_classes=NUM_CLASSES, image_size=SIZE)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    same = create_model("tv:resnet18", num_classes=NUM_CLASSES, image_size=SIZE, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    grey = create_model("tv:resnet18", num_classes=5, in_channels=1, image_size=SIZE, pretrained=str(path))
    state = grey.state_dict()
    torch.testing.assert_close(state["conv1.weight"], source.conv1.weight.detach().sum(dim=1, keepdim=True))
    assert torch.equal(state["layer3.1.conv2.weight"], source.layer3[1].conv2.weight)
    assert state["fc.weight"].shape == (5, 512)
    wrong = tmp_path / "convnext.pth"
    torch.save(create_model("timm:convnext_atto", num_classes=NUM_CLASSES).state_dict(), wrong)
    with pytest.raises(ConfigError, match="convnext.pth.*does not fit tv:resnet18.*missing") as err:
        create_model("tv:resnet18", num_classes=NUM_CLASSES, pretrained=str(wrong))
    assert "\n" not in str(err.value)


def test_safetensors_checkpoint_round_trip(tmp_path):
    """A ViT file for 64 px into a 32 px model: the position embedding is resampled (class token kept)."""
    name = "timm:deit_tiny_patch16_224"
    source = create_model(name, num_classes=NUM_CLASSES, image_size=64)
    path = tmp_path / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model(name, num_classes=NUM_CLASSES, image_size=SIZE, pretrained=str(path))
    state = model.state_dict()
    assert torch.equal(state["blocks.3.mlp.fc1.weight"], source.blocks[3].mlp.fc1.weight)
    assert torch.equal(state["head.weight"], source.head.weight)  # same classes: the file's head
    assert state["pos_embed"].shape == (1, 5, 192)
    assert torch.equal(state["pos_embed"][:, 0], source.pos_embed[:, 0].detach())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="junk.safetensors.*cannot be read as a safetensors file"):
        create_model(name, num_classes=NUM_CLASSES, image_size=SIZE, pretrained=str(junk))


def test_adapt_input_weight():
    weight = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(adapt_input_weight(weight, 1), weight.sum(dim=1, keepdim=True))
    five = adapt_input_weight(weight, 5)
    assert five.shape == (4, 5, 2, 2)
    torch.testing.assert_close(five[:, 3], weight[:, 0] * 3 / 5)


# ----------------------------------------------------------------------------- errors


def test_unknown_names_say_how_to_find_names():
    with pytest.raises(UnknownNameError, match=r"did you mean tv:resnet18.*list_models\(module=torchvision.models\)"):
        create_model("tv:resnet1", num_classes=NUM_CLASSES)
    with pytest.raises(UnknownNameError, match=r"unknown timm .*'no_such_net'.*timm.list_models"):
        MODELS.get("timm:no_such_net")
    with pytest.raises(UnknownNameError, match=r"resnet34.*tv:<name> / timm:<name>"):
        MODELS.get("resnet35")


def test_width_has_no_meaning_for_library_models(tmp_path):
    with pytest.raises(ConfigError, match=r"width=0.5 has no meaning.*set teacher.width=1.0"):
        create_model("tv:resnet18", num_classes=NUM_CLASSES, width=0.5)
    with pytest.raises(ConfigError, match=r"width=0.25 has no meaning"):
        create_model("timm:convnext_atto", num_classes=NUM_CLASSES, width=0.25, pretrained=str(tmp_path / "x.pth"))


def test_unsupported_models_are_refused_clearly():
    with pytest.raises(ConfigError, match="channels-last"):
        create_model("tv:swin_t", num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.stages
def test_stage1_and_stage2_with_library_models(tmp_path):
    """Stage 1 (teacher, S/I/E/Q, selection, cache) and stage 2 (ours, detached head) with a
    torchvision teacher and a timm student on a tiny Fashion-MNIST stand-in, one epoch each."""
    from common import distill
    from common.profile import runner as profile
    from common.layers.tables import list_layers
    from common.checks import load_data_checked
    from common.config import load_config
    from tests.fakedata import make_fashion_mnist

    make_fashion_mnist(tmp_path / "fmnist", n_train=120, n_test=40, seed=0)
    cfg = load_config(None, [
        f"dataset.root={tmp_path / 'fmnist'}", f"artifacts={tmp_path / 'artifacts'}",
        "teacher.name=tv:resnet18", "student.name=timm:test_resnet", "method.name=ours",
        "teacher_train.epochs=1", "teacher_train.batch_size=40", "teacher_train.progress=false",
        "train.epochs=1", "train.batch_size=40", "train.progress=false",
        "profile.subset_size=60", "profile.per_class_cap=6", "profile.batch_size=60", "profile.progress=false",
    ])
    data = load_data_checked(cfg)
    table = list_layers(cfg, data)
    assert list(table["module"])[:2] == ["maxpool", "layer1.0"] and list(table["baseline"]).count(True) == 4
    prof = profile.run(cfg, data)
    assert len(prof.selected) == cfg.profile.k
    result = distill.run(cfg, seeds=[0], data=data)[0]
    assert (result.dir / "done").exists() and 0 <= result.best_test_acc <= 100
