"""The CIFAR-100 KD benchmark zoo (`cifar:<name>`): the published layout and function, layers, checkpoints.

Golden facts: tests/golden/cifar_kd_zoo.json, measured on HobbitLong/RepDistiller@b84f547
`models/` (its "source"): for each of the 22 models at 100 classes, the parameter count, every
state-dict key with its shape in order, the shapes of the `is_feat=True` features, and float64
eval-mode logits of a fixed input with the weights set by the file's "rule". Reproducing those
logits with the same keys is what says a published checkpoint loads into the same function.
"""
from __future__ import annotations

import collections
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.layers.hooks import extract, forward_with_features, generalized_layers, head_position, linearize
from common.models import EXTERNAL_LR, MODELS, create_model
from common.models.cifar import ZOO
from common.models.cifar.checkpoint import load_zoo_checkpoint
from common.registry import UnknownNameError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "cifar_kd_zoo.json").read_text())
NAMES = list(GOLDEN["models"])


def _resnet(depth: int) -> tuple[int, tuple[int, ...]]:
    n = (depth - 2) // 6  # stem ReLU, 3n BasicBlocks, Flatten
    return 3 * n + 2, (n, 2 * n, 3 * n)


def _wrn(depth: int) -> tuple[int, tuple[int, ...]]:
    n = (depth - 4) // 6  # stem conv, 3n blocks, final ReLU, Flatten
    return 3 * n + 3, (n, 2 * n, 3 * n)


def _vgg(convs: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    ends = [sum(convs[: i + 1]) - 1 for i in range(len(convs))]  # one ReLU per conv, then Flatten
    return sum(convs) + 1, tuple(ends[1:])


# name -> (number of generalized layers, baseline list = last block of stages f1..fN), derived
# here from the architectures (not read from the code under test).
LAYERS: dict[str, tuple[int, tuple[int, ...]]] = {
    **{f"resnet{d}": _resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8),
    "resnet32x4": _resnet(32),
    "ResNet50": (18, (3, 7, 13, 16)),  # stem, 3+4+6+3 Bottlenecks, Flatten
    "wrn_16_1": _wrn(16), "wrn_16_2": _wrn(16), "wrn_40_1": _wrn(40), "wrn_40_2": _wrn(40),
    "vgg8": _vgg((1, 1, 1, 1, 1)),
    "vgg11": _vgg((1, 1, 2, 2, 2)),
    "vgg13": _vgg((2, 2, 2, 2, 2)),
    "vgg16": _vgg((2, 2, 3, 3, 3)),
    "vgg19": _vgg((2, 2, 4, 4, 4)),
    "MobileNetV2": (20, (3, 6, 13, 17)),  # stem, 1+2+3+4+3+3+1 blocks, conv2 ReLU, Flatten
    "ShuffleV1": (18, (4, 12, 16)),  # stem, 4+8+4 units, Flatten
    "ShuffleV2": (19, (4, 12, 16)),  # stem, (1+3)+(1+7)+(1+3) blocks, conv2 ReLU, Flatten
}
# The generalized layer of is_feat's first feature f0: the stem, or VGG's block0 end.
F0_LAYER = {"vgg13": 1, "vgg16": 1, "vgg19": 1}


def rule_weight(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The golden file's weight rule, for one state-dict entry (see GOLDEN["rule"])."""
    n = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())), dtype=torch.float64)
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    if key.endswith("running_mean"):
        return 0.1 * n
    if key.endswith("running_var"):
        return 1 + 0.1 * n.abs()
    if key.endswith(".weight") and len(shape) == 1:  # BatchNorm weight
        return 1 + 0.1 * n
    if key.endswith("bias"):
        return 0.1 * n
    return n / math.sqrt(math.prod(shape[1:]))


def rule_model(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = create_model(f"cifar:{name}", num_classes=GOLDEN["num_classes"]).to(dtype).eval()
    model.load_state_dict({k: rule_weight(k, tuple(v.shape)) for k, v in model.state_dict().items()})
    return model


def rule_input() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_golden_file_names_its_source_and_rule():
    assert GOLDEN["source"].startswith("HobbitLong/RepDistiller@b84f547 models/")
    assert "zlib.crc32" in GOLDEN["rule"] and "eval mode, float64" in GOLDEN["rule"]
    assert set(ZOO) == set(GOLDEN["models"]) == set(LAYERS) and len(ZOO) == 22


@pytest.mark.parametrize("name", NAMES)
def test_parameters_and_state_dict_layout(name):
    ref = GOLDEN["models"][name]
    model = create_model(f"cifar:{name}", num_classes=100)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["params"]
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["state_dict"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_stage_features_match_the_reference(name):
    """One float64 forward: logits to 1e-8 relative, and the is_feat features' shapes read by
    the project's layer hooks at the stem (f0), the baseline layers (f1..fN) and the Flatten."""
    ref = GOLDEN["models"][name]
    model = rule_model(name)
    n_layers, baseline = LAYERS[name]
    layers = [F0_LAYER.get(name, 0), *baseline, n_layers - 1]
    with torch.no_grad():
        logits, features = forward_with_features(model, rule_input(), layers)
    expected = torch.tensor(ref["logits"], dtype=torch.float64)
    assert logits.dtype == torch.float64 and logits.shape == expected.shape
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-8
    assert [list(features[i].shape[1:]) for i in layers] == ref["is_feat_shapes"]


@pytest.mark.parametrize("name", NAMES)
def test_generalized_layers_and_baseline_list(name):
    model = create_model(f"cifar:{name}", num_classes=100)
    gen = generalized_layers(model)
    n_layers, baseline = LAYERS[name]
    spec = MODELS.get(f"cifar:{name}")
    assert len(gen) == n_layers
    assert isinstance(gen[-1].module, nn.Flatten) and head_position(model) == gen[-1].position + 1
    assert spec.baseline_layers == baseline
    assert (spec.family, spec.lr_ce, spec.lr_kd, spec.library) == ("cnn", EXTERNAL_LR, EXTERNAL_LR, None)
    if name.startswith("resnet") or name.startswith("ResNet"):  # the last block of each stage, by path
        stages = [m for path, m in model.named_children() if path.startswith("layer")]
        assert [gen[i].path for i in baseline] == [f"layer{s + 1}.{len(m) - 1}" for s, m in enumerate(stages)]
    if name.startswith("wrn"):
        n = (int(name.split("_")[1]) - 4) // 6
        assert [gen[i].path for i in baseline] == [f"block{s}.layer.{n - 1}" for s in (1, 2, 3)]
        assert gen[0].path == "conv1"


@pytest.mark.parametrize("name", NAMES)
def test_sequential_property(name):
    """The linearised modules run in order give model(x), each called once in model(x)
    (common/layers/hooks.py's contract: SimKD's reused head, the detached head)."""
    model = create_model(f"cifar:{name}", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    modules = linearize(model)
    calls: collections.Counter[str] = collections.Counter()
    handles = [m.register_forward_hook(lambda *_, p=path: calls.update([p])) for path, m in modules]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == collections.Counter(path for path, _ in modules)
    with torch.no_grad():
        chained = x
        for _, module in modules:
            chained = module(chained)
    assert torch.equal(chained, logits)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_imagenet_size_runs(name):
    """64-px inputs: the adaptive pools take the larger maps, the classifier its usual vector."""
    model = create_model(f"cifar:{name}", num_classes=200, image_size=64).eval()
    features = extract(model, torch.randn(1, 3, 64, 64), [-1])
    assert features[len(generalized_layers(model)) - 1].shape == (1, model.state_dict()[_head(model) + "weight"].shape[1])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def _head(model: nn.Module) -> str:
    return [path for path, m in model.named_modules() if isinstance(m, nn.Linear)][-1] + "."


# ----------------------------------------------------------------------------- bad names and arguments


def test_bad_names_and_arguments():
    with pytest.raises(UnknownNameError, match=r"cifar:resnet8x4"):
        MODELS.get("cifar:resnet8x5")
    with pytest.raises(ConfigError, match=r"width=0.5 has no meaning"):
        create_model("cifar:resnet8", num_classes=10, width=0.5)
    with pytest.raises(ConfigError, match=r"3-channel images.*has 1"):
        create_model("cifar:resnet8", num_classes=10, in_channels=1)
    assert "cifar:resnet8" not in MODELS.names()  # made on first use, as tv:/timm: names


# ----------------------------------------------------------------------------- published checkpoints


def _save(tmp_path: Path, name: str, num_classes: int = 100, **extra) -> tuple[Path, nn.Module]:
    model = create_model(f"cifar:{name}", num_classes=num_classes).eval()
    path = tmp_path / f"{name}_{num_classes}" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": model.state_dict(), **extra}, path)
    return path, model


def test_published_layout_round_trip(tmp_path):
    # RepDistiller's train_teacher.py saves the accuracy as a tensor and the optimizer state too.
    path, saved = _save(tmp_path, "resnet8x4", accuracy=torch.tensor(73.09), optimizer={"state": {}, "param_groups": []})
    loaded = create_model("cifar:resnet8x4", num_classes=100, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved(x))
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in saved.state_dict().items()}, bare)  # DataParallel's prefix
    fresh = create_model("cifar:resnet8x4", num_classes=100).eval()
    load_zoo_checkpoint(fresh, str(bare))
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path, _ = _save(tmp_path, "resnet8")
    with pytest.raises(ConfigError) as err:
        create_model("cifar:resnet8x4", num_classes=100, pretrained=str(path))
    message = str(err.value)
    assert str(path) in message and "does not hold cifar:resnet8x4" in message
    assert "100-class cifar:resnet8 checkpoint" in message and "of another shape" in message
    assert "\n" not in message


def test_checkpoint_of_other_classes_is_refused(tmp_path):
    path, _ = _save(tmp_path, "wrn_16_1", num_classes=10)
    with pytest.raises(ConfigError) as err:
        create_model("cifar:wrn_16_1", num_classes=100, pretrained=str(path))
    message = str(err.value)
    assert str(path) in message and "for 10 classes (fc.weight (10, 64))" in message and "built for 100" in message


def test_unreadable_checkpoints_are_config_errors(tmp_path):
    model = create_model("cifar:resnet8", num_classes=100)
    with pytest.raises(ConfigError, match="not found"):
        load_zoo_checkpoint(model, str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as a torch file"):
        load_zoo_checkpoint(model, str(junk))
    no_weights = tmp_path / "no_weights.pth"
    torch.save({"epoch": 240, "accuracy": 71.2}, no_weights)
    with pytest.raises(ConfigError, match=r"holds a dict with keys \['accuracy', 'epoch'\], not a state dict"):
        load_zoo_checkpoint(model, str(no_weights))
