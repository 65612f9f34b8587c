"""Model registry: METHOD 4.2 layer tables, the sequential property, pretrained loading (METHOD 3)."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from common.errors import ConfigError
from common.layers.hooks import generalized_layers, head_position, layer_infos, linearize
from common.models import MODELS, create_model
from common.models.pretrained import load_vit, rename_torchvision_vit_keys
from common.models.vit import vit
from common.registry import UnknownNameError

SMALL = dict(num_classes=10, in_channels=1, image_size=28, width=0.25)
# A small torchvision ViT and the matching ViT of ours, for the pretrained-loading tests.
TV_VIT = dict(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
OUR_VIT = dict(depth=2, heads=2, dim=16, mlp_dim=32)


def _repeat(*groups: tuple[int, tuple[int, ...]]) -> list[tuple[int, ...]]:
    return [shape for count, shape in groups for _ in range(count)]


# METHOD 4.2 at CIFAR size (3x32x32), transcribed from the tables; resnet18 follows the same rule.
CIFAR_TABLES: dict[str, list[tuple[int, ...]]] = {
    "resnet34": _repeat((4, (64, 32, 32)), (4, (128, 16, 16)), (6, (256, 8, 8)), (3, (512, 4, 4)), (1, (512,))),
    "resnet18": _repeat((3, (64, 32, 32)), (2, (128, 16, 16)), (2, (256, 8, 8)), (2, (512, 4, 4)), (1, (512,))),
    "resnet9": _repeat((2, (64, 32, 32)), (1, (128, 16, 16)), (1, (256, 8, 8)), (1, (512, 4, 4)), (1, (512,))),
    "vgg19": _repeat(
        (2, (64, 32, 32)), (2, (128, 16, 16)), (4, (256, 8, 8)), (4, (512, 4, 4)), (4, (512, 2, 2)),
        (1, (512,)), (2, (4096,)),
    ),
    "vgg11": _repeat(
        (1, (64, 32, 32)), (1, (128, 16, 16)), (2, (256, 8, 8)), (2, (512, 4, 4)), (2, (512, 2, 2)),
        (1, (512,)), (2, (4096,)),
    ),
    "mobilenetv2": _repeat(
        (1, (32, 32, 32)), (1, (16, 32, 32)), (2, (24, 16, 16)), (3, (32, 8, 8)), (4, (64, 4, 4)), (3, (96, 4, 4)),
        (3, (160, 2, 2)), (1, (320, 2, 2)), (1, (1280, 2, 2)), (1, (1280,)),
    ),
    "vit_b": _repeat((13, (65, 768))),
    "vit_ett": _repeat((9, (65, 192))),
}
HEAD_FIRST_GEN = {"vgg19": 17, "vgg11": 9}  # others: no generalized layer inside the head
BASELINES = {
    "resnet34": (3, 7, 13, 16), "resnet9": (1, 2, 3, 4), "resnet18": (2, 4, 6, 8), "vgg19": (3, 7, 11, 15),
    "vgg11": (1, 3, 5, 7), "mobilenetv2": (3, 6, 13, 17), "vit_b": (2, 4, 8, 10), "vit_ett": (1, 3, 5, 7),
}
PARAMS_MILLIONS = {"vit_b": (85.2, 0.1), "vit_ett": (3.0, 0.05)}  # METHOD 3.4, CIFAR-10


def test_every_model_has_a_table():
    assert set(MODELS.names()) == set(CIFAR_TABLES)


@pytest.mark.parametrize("name", sorted(CIFAR_TABLES))
def test_layer_table_at_cifar_size(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    table = layer_infos(model, (3, 32, 32))
    assert [info.shape for info in table] == CIFAR_TABLES[name]
    head = head_position(model)
    in_head = [g.index for g in generalized_layers(model) if g.position > head]
    assert (in_head[0] if in_head else None) == HEAD_FIRST_GEN.get(name)
    if name in PARAMS_MILLIONS:
        expected, tol = PARAMS_MILLIONS[name]
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - expected) < tol


@pytest.mark.parametrize(
    "name, first_two",
    [
        ("resnet9", [(16, 64, 64), (16, 32, 32)]),  # stem max-pool only above 32 px
        ("vgg11", [(16, 64, 64), (32, 32, 32)]),
        ("mobilenetv2", [(8, 32, 32), (8, 32, 32)]),  # stem stride 2 above 32 px
        ("vit_ett", [(65, 48), (65, 48)]),  # patch 8 above 32 px
    ],
)
def test_tiny_imagenet_size_rules(name, first_two):
    model = create_model(name, num_classes=200, image_size=64, width=0.25)
    assert [info.shape for info in layer_infos(model, (3, 64, 64))[:2]] == first_two


def test_width_rules():
    resnet = layer_infos(create_model("resnet34", num_classes=10, width=0.25), (3, 32, 32))
    assert sorted({info.shape[0] for info in resnet}) == [16, 32, 64, 128]
    vit_small = create_model("vit_ett", num_classes=10, width=0.3)  # 6 heads, 192 * 0.3 / 6 = 9.6 -> 10
    assert vit_small.ln.normalized_shape[0] == 60


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name, **SMALL) for name in MODELS.names()}


@pytest.mark.parametrize("name", sorted(CIFAR_TABLES))
def test_sequential_property_and_single_calls(name, small_models):
    model = small_models[name].eval()
    x = torch.randn(2, 1, 28, 28)
    calls: collections.Counter[str] = collections.Counter()
    modules = linearize(model)
    handles = [m.register_forward_hook(lambda *_, p=path: calls.update([p])) for path, m in modules]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == collections.Counter(path for path, _ in modules)  # each list module exactly once
    assert all(calls[g.path] == 1 for g in generalized_layers(model))
    with torch.no_grad():
        chained = x
        for _, module in modules:
            chained = module(chained)
    assert logits.shape == (2, 10)
    assert torch.equal(chained, logits)


@pytest.mark.parametrize("name", sorted(CIFAR_TABLES))
def test_backward_reaches_every_parameter(name, small_models):
    model = small_models[name].train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", sorted(CIFAR_TABLES))
def test_baseline_lists(name, small_models):
    spec = MODELS.get(name)
    gen = generalized_layers(small_models[name])
    assert spec.baseline_layers == BASELINES[name]
    assert list(spec.baseline_layers) == sorted(set(spec.baseline_layers))
    assert all(0 <= i < len(gen) for i in spec.baseline_layers)
    assert spec.family == ("vit" if name.startswith("vit") else "cnn")
    assert spec.lr_kd == (0.05 if name in ("resnet9", "mobilenetv2") else 0.01) and spec.lr_ce == 0.01
    if name.startswith("resnet"):  # last block of each stage
        model = small_models[name]
        last_blocks = [f"layer{s}.{len(getattr(model, f'layer{s}')) - 1}" for s in range(1, 5)]
        assert [gen[i].path for i in spec.baseline_layers] == last_blocks


def test_unknown_model_name():
    with pytest.raises(UnknownNameError, match="resnet34"):
        create_model("resnet35", num_classes=10)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="width"):
        create_model("resnet9", num_classes=10, width=0)
    with pytest.raises(ConfigError, match="no ImageNet loader"):
        create_model("resnet9", num_classes=10, pretrained=str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="x.pth.*width"):
        create_model("resnet34", num_classes=10, width=0.5, pretrained=str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="patch size 4 does not divide"):
        create_model("vit_ett", num_classes=10, image_size=30)


# ---------------------------------------------------------------- pretrained (local files only)


def _fill(shape: torch.Size, key: str) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0)
    if key.endswith("running_var"):
        return torch.rand(shape) + 0.5
    return torch.randn(shape) * 0.05


@pytest.fixture(scope="module")
def resnet34_file(tmp_path_factory):
    torch.manual_seed(1)
    reference = torchvision.models.resnet34()  # weights=None: never downloads
    state = {k: _fill(v.shape, k) for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    path = tmp_path_factory.mktemp("pretrained") / "resnet34.pth"
    torch.save(state, path)
    return path, state, reference.eval()


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    torch.manual_seed(2)
    with torch.device("meta"):  # exact torchvision keys and shapes, without the 143M-parameter init
        shapes = {k: v.shape for k, v in torchvision.models.vgg19_bn().state_dict().items()}
    state = {k: _fill(s, k) for k, s in shapes.items() if k != "classifier.0.weight"}
    # Replaced on load anyway; a stride-0 view keeps the 4096 x 25088 shape but stores one float.
    state["classifier.0.weight"] = torch.zeros(1).expand(shapes["classifier.0.weight"])
    path = tmp_path_factory.mktemp("pretrained") / "vgg19_bn.pth"
    torch.save(state, path)
    return path, state


def test_resnet34_pretrained(resnet34_file):
    path, file_state, reference = resnet34_file
    model = create_model("resnet34", num_classes=10, pretrained=str(path)).eval()
    state = model.state_dict()
    replaced = {"conv1.weight", "fc.weight", "fc.bias"}
    assert all(torch.equal(state[k], v) for k, v in file_state.items() if k not in replaced)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert state["fc.weight"].shape == (10, 512) and abs(state["fc.weight"].std().item() - 0.01) < 0.002
    assert torch.equal(state["fc.bias"], torch.zeros(10))
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            expected = getattr(reference, stage)(x)
            assert torch.allclose(getattr(model, stage)(x), expected, atol=1e-5)
            x = expected
    grey = create_model("resnet34", num_classes=10, in_channels=1, pretrained=str(path))
    assert grey.conv1.weight.shape == (64, 1, 3, 3)


def test_vgg19_pretrained(vgg19_file):
    path, file_state = vgg19_file
    model = create_model("vgg19", num_classes=10, pretrained=str(path)).eval()
    state = model.state_dict()
    kept = [k for k in file_state if k.startswith("features.")]
    kept += ["classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]
    assert all(torch.equal(state[k], file_state[k]) for k in kept)
    assert state["classifier.0.weight"].shape == (4096, 512)
    assert abs(state["classifier.0.weight"].std().item() - 0.01) < 0.001
    assert state["classifier.6.weight"].shape == (10, 4096) and torch.equal(state["classifier.6.bias"], torch.zeros(10))
    # A 1-channel model sees exactly what the RGB network sees on the grey image replicated.
    grey = create_model("vgg19", num_classes=10, in_channels=1, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey.features(x), model.features(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_wrong_pretrained_files(resnet34_file, vgg19_file, tmp_path):
    resnet_path = resnet34_file[0]
    with pytest.raises(ConfigError, match="resnet34.pth.*missing features.0.weight") as err:
        create_model("vgg11", num_classes=10, pretrained=str(resnet_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="vgg19_bn.pth.*missing"):
        create_model("resnet18", num_classes=10, pretrained=str(vgg19_file[0]))
    with pytest.raises(ConfigError, match="resnet34.pth.*(missing|unexpected)"):
        create_model("resnet18", num_classes=10, pretrained=str(resnet_path))
    with pytest.raises(ConfigError, match="nope.pth' not found"):
        create_model("resnet18", num_classes=10, pretrained=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth.*cannot be read"):
        load_vit(vit(num_classes=10, **OUR_VIT), str(junk))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(3)
    reference = TorchvisionViT(**TV_VIT).eval()
    state = {k: torch.randn(v.shape) * 0.2 for k, v in reference.state_dict().items()}
    # Position grid (4x4) linear in (row, col), so the bilinear resampling has a closed form.
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    a, b, c = torch.randn(3, 16)
    state["encoder.pos_embedding"][0, 1:] = (a + rows.reshape(-1, 1) * b + cols.reshape(-1, 1) * c)
    reference.load_state_dict(state)
    path = tmp_path_factory.mktemp("pretrained") / "vit_tiny.pth"
    torch.save(state, path)
    return path, state, reference, (a, b, c)


def test_vit_pretrained_same_geometry_matches_torchvision(vit_file):
    path, _, reference, _ = vit_file
    model = vit(num_classes=10, image_size=64, patch=16, **OUR_VIT)
    load_vit(model, str(path))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = reference._process_input(x)
        tokens = torch.cat([reference.class_token.expand(2, -1, -1), tokens], dim=1)
        expected = reference.encoder(tokens)
        ours = x
        for name in ("patch_embed", "pos_embed", "encoder", "ln"):
            ours = getattr(model, name)(ours)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.equal(model.head.weight, torch.zeros(10, 16))  # ImageNet head dropped, ours stays zero


def test_vit_pretrained_resampling_and_legacy_names(vit_file, tmp_path):
    path, state, _, (a, b, c) = vit_file
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    assert legacy.keys() != state.keys()
    assert rename_torchvision_vit_keys(legacy).keys() == rename_torchvision_vit_keys(state).keys()
    legacy_path = tmp_path / "vit_legacy.pth"
    torch.save(legacy, legacy_path)
    for in_channels in (3, 1):
        model = vit(num_classes=10, in_channels=in_channels, image_size=32, **OUR_VIT)  # patch 4, 8x8 grid
        load_vit(model, str(legacy_path))
        pos = model.pos_embed.pos_embedding.detach()[0]
        assert pos.shape == (65, 16)
        assert torch.equal(pos[0], state["encoder.pos_embedding"][0, 0])  # class token stays first
        rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        scale = 3 / 7  # order-1 zoom maps the 8 new grid points onto 0..3 evenly, corners aligned
        expected = a + scale * (rows.reshape(-1, 1) * b + cols.reshape(-1, 1) * c)
        assert torch.allclose(pos[1:], expected, atol=1e-5)
        file_kernel = state["conv_proj.weight"]  # (16, 3, 16, 16) -> 4x4 by 4x4 average pooling
        block = file_kernel[5, :, 4:8, 8:12].mean(dim=(-1, -2))
        ours = model.patch_embed.conv_proj.weight.detach()[5, :, 1, 2]
        assert torch.allclose(ours, block if in_channels == 3 else block.sum(0, keepdim=True), atol=1e-6)
        layer1 = "encoder.encoder_layer_1.mlp.3.weight"
        assert torch.equal(model.state_dict()[layer1], state["encoder.layers.encoder_layer_1.mlp.3.weight"])


def test_vit_pretrained_wrong_dims(vit_file):
    wider = vit(num_classes=10, image_size=32, depth=2, heads=2, dim=32, mlp_dim=32)
    with pytest.raises(ConfigError, match="vit_tiny.pth.*wrong shape"):
        load_vit(wider, str(vit_file[0]))
