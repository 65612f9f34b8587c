"""Model registry (METHOD 3, 4.2): name -> ModelSpec, and `create_model`.

Every model here is *sequential* (running `common.layers.hooks.linearize(model)` in order is
`model(x)`), uses no in-place activations, and takes `num_classes`, `in_channels`, `image_size`
(any size, e.g. 28, 32, 64) and a `width` multiplier for small CPU-sized versions. Width rules:
ResNet/VGG round(c * width) (at least 1); MobileNetV2 rounds up to a multiple of 8; ViT keeps
the heads and rounds the head dim (see `common.models.vit.scale_dims`).

Besides these paper models, `tv:<name>` and `timm:<name>` name any torchvision or timm
classifier (`common.models.external`); their specs are made on first use and are not listed by
`MODELS.names()`. Their width is fixed (1.0), and they are not sequential: they carry a
`common.layers.hooks.LayerChain` instead.

`cifar:<name>` names the CIFAR-100 KD benchmark zoo (`common.models.cifar`: RepDistiller's 22
models, e.g. cifar:resnet32x4, with the public checkpoints' state-dict layout); also made on first
use, width fixed at 1.0, 3-channel inputs, any image size (adaptive pooling), and
`teacher.pretrained` reads the published `{"model": state_dict, ...}` files.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.errors import ConfigError
from common.models import cifar, external
from common.models.cifar.checkpoint import load_zoo_checkpoint
from common.models.mobilenetv2 import mobilenetv2
from common.models.pretrained import load_resnet, load_vgg, load_vit
from common.models.resnet import resnet9, resnet18, resnet34
from common.models.vgg import vgg11, vgg19
from common.models.vit import vit, vit_b, vit_ett
from common.registry import Registry, UnknownNameError

__all__ = ["MODELS", "ModelSpec", "create_model", "vit"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(num_classes=, in_channels=, image_size=, width=) -> nn.Module
    baseline_layers: tuple[int, ...]  # the "Baseline" distillation list (METHOD 4.2 table)
    family: str  # "cnn" or "vit"
    lr_ce: float  # reference peak LR as a CE-only student / teacher (METHOD 8.7)
    lr_kd: float  # reference peak LR in KD configs (METHOD 8.7, 12.1)
    load_pretrained: Callable[[nn.Module, str], None] | None  # local torchvision ImageNet file
    library: str | None = None  # "torchvision" / "timm" for tv:/timm: names (width fixed at 1.0)


# Peak LR of tv:/timm: models, as a CE-only model and in KD: the reference's AdamW/OneCycle value
# for every paper model but its two small KD students (METHOD 8.7), ViTs included; not tuned per
# library model (set train.lr / teacher_train.lr).
EXTERNAL_LR = 0.01


class ModelRegistry(Registry[ModelSpec]):
    """The paper's models by name, plus `tv:<name>` / `timm:<name>` made on first use."""

    def get(self, name: str) -> ModelSpec:
        if external.split_name(name) is not None:
            return _external_spec(name)
        if cifar.split_name(name) is not None:
            return _cifar_spec(cifar.PREFIX + cifar.arch_of(name))
        try:
            return super().get(name)
        except UnknownNameError as exc:
            raise UnknownNameError(
                f"{exc}; or any torchvision / timm classifier as tv:<name> / timm:<name>, e.g. tv:resnet18; "
                f"or a CIFAR KD benchmark model as cifar:<name>, e.g. cifar:resnet32x4"
            ) from None


@functools.lru_cache(maxsize=None)
def _external_spec(name: str) -> ModelSpec:
    """Baseline list and family from `external.describe` (shapes at the model's default size);
    LRs `EXTERNAL_LR`; any local checkpoint of the architecture loads (`external.load_checkpoint`)."""
    facts = external.describe(name)
    return ModelSpec(
        name,
        functools.partial(external.build, name),
        facts.baseline_layers,
        facts.family,
        EXTERNAL_LR,
        EXTERNAL_LR,
        functools.partial(external.load_checkpoint, name=name),
        library=external.LIBRARIES[name.partition(":")[0]],
    )


@functools.lru_cache(maxsize=None)
def _cifar_spec(name: str) -> ModelSpec:
    """A CIFAR KD zoo model: its baseline list (last block of each stage, METHOD 4.2), family
    "cnn", LRs `EXTERNAL_LR` (the benchmark's SGD recipe is a config of its own), and the
    published checkpoints as `load_pretrained` (strict: same architecture, same classes)."""
    arch = cifar.arch_of(name)
    return ModelSpec(
        name,
        functools.partial(cifar.build, name),
        cifar.BASELINE_LAYERS[arch],
        "cnn",
        EXTERNAL_LR,
        EXTERNAL_LR,
        functools.partial(load_zoo_checkpoint, name=name),
    )


MODELS: ModelRegistry = ModelRegistry("model")

for _spec in (
    ModelSpec("resnet9", resnet9, (1, 2, 3, 4), "cnn", 0.01, 0.05, None),
    # Not in the paper: baseline = last block of each stage, as for ResNet9/34.
    ModelSpec("resnet18", resnet18, (2, 4, 6, 8), "cnn", 0.01, 0.01, load_resnet),
    ModelSpec("resnet34", resnet34, (3, 7, 13, 16), "cnn", 0.01, 0.01, load_resnet),
    ModelSpec("vgg11", vgg11, (1, 3, 5, 7), "cnn", 0.01, 0.01, load_vgg),
    ModelSpec("vgg19", vgg19, (3, 7, 11, 15), "cnn", 0.01, 0.01, load_vgg),
    ModelSpec("mobilenetv2", mobilenetv2, (3, 6, 13, 17), "cnn", 0.01, 0.05, None),
    ModelSpec("vit_b", vit_b, (2, 4, 8, 10), "vit", 0.01, 0.01, load_vit),
    ModelSpec("vit_ett", vit_ett, (1, 3, 5, 7), "vit", 0.01, 0.01, None),
):
    MODELS.register(_spec.name, _spec)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    pretrained: str | None = None,
) -> nn.Module:
    """Build a registered (or tv:/timm:) model, optionally with local weights (METHOD 3)."""
    spec = MODELS.get(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(value) != value or value < 1:
            raise ConfigError(f"model {key} must be a positive integer, got {value!r}; fix it in the config")
    if not width > 0:
        raise ConfigError(f"model.width must be > 0, got {width!r}; use e.g. 1.0 or 0.25")
    if spec.library is not None and width != 1.0:
        raise external.width_error(name, width)
    if pretrained is not None:
        if spec.load_pretrained is None:
            raise ConfigError(f"model '{name}' has no ImageNet loader; set model.pretrained: null")
        if width != 1.0:
            raise ConfigError(
                f"pretrained file '{pretrained}' holds width-1.0 weights but model.width is {width}; "
                f"set model.width: 1.0 or model.pretrained: null"
            )
    model = spec.build(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    if pretrained is not None:
        spec.load_pretrained(model, pretrained)
    return model
