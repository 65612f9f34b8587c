"""Model registry (METHOD 3, 4.2): name -> ModelSpec, and `create_model`.

Every model here is *sequential* (running `common.layers.linearize(model)` in order is
`model(x)`), uses no in-place activations, and takes `num_classes`, `in_channels`, `image_size`
(any size, e.g. 28, 32, 64) and a `width` multiplier for small CPU-sized versions. Width rules:
ResNet/VGG round(c * width) (at least 1); MobileNetV2 rounds up to a multiple of 8; ViT keeps
the heads and rounds the head dim (see `common.models.vit.scale_dims`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from common.errors import ConfigError
from common.models.mobilenetv2 import mobilenetv2
from common.models.pretrained import load_resnet, load_vgg, load_vit
from common.models.resnet import resnet9, resnet18, resnet34
from common.models.vgg import vgg11, vgg19
from common.models.vit import vit, vit_b, vit_ett
from common.registry import Registry

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


MODELS: Registry[ModelSpec] = Registry("model")

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
    """Build a registered model, optionally with local ImageNet weights (METHOD 3)."""
    spec = MODELS.get(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if int(value) != value or value < 1:
            raise ConfigError(f"model {key} must be a positive integer, got {value!r}; fix it in the config")
    if not width > 0:
        raise ConfigError(f"model.width must be > 0, got {width!r}; use e.g. 1.0 or 0.25")
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
