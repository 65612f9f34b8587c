"""The CIFAR-100 knowledge-distillation benchmark zoo, `cifar:<name>` (CRD / DKD tables).

The 22 models of HobbitLong/RepDistiller@b84f547 `models/` (mdistiller's `models/cifar` are the
same), each with the state-dict layout of the public `cifar_teachers` checkpoints, so a published
`{"model": state_dict, ...}` file loads as it is (`checkpoint.load_zoo_checkpoint`):

    resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet8x4 resnet32x4
    ResNet50 wrn_16_1 wrn_16_2 wrn_40_1 wrn_40_2 vgg8 vgg11 vgg13 vgg16 vgg19
    MobileNetV2 ShuffleV1 ShuffleV2

Every model is sequential in the project's sense (forward = its linearised modules in order,
METHOD 4.1), with the blocks (and the stem) as generalized layers. `BASELINE_LAYERS` gives the
last block of each stage (METHOD 4.2's CNN rule), which are the stage features f1..fN the
reference returns with `is_feat=True`.

Input size: where the reference pools with a fixed window sized for 32 px (AvgPool2d(8) in the
ResNets and WRNs, a 2x2 window in MobileNetV2), these models pool adaptively: the same numbers at
32 px, and 64-px inputs (Tiny ImageNet) work. Width is the benchmark's (1.0 only) and inputs have
3 channels, as the published checkpoints.
"""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from common.errors import ConfigError
from common.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from common.registry import UnknownNameError

PREFIX = "cifar:"
_MODULES = (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2)

# name (as in RepDistiller's model_dict) -> build(num_classes=...)
ZOO: dict[str, Callable[..., nn.Module]] = {name: b for m in _MODULES for name, b in m.BUILDERS.items()}
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {name: b for m in _MODULES for name, b in m.BASELINE_LAYERS.items()}
assert set(ZOO) == set(BASELINE_LAYERS), "every zoo model needs its baseline list"


def split_name(name: str) -> str | None:
    """'cifar:resnet8x4' -> 'resnet8x4'; None for a name without the prefix."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def arch_of(name: str) -> str:
    """The zoo name behind `cifar:<name>`; UnknownNameError (with a close match) otherwise."""
    arch = split_name(name)
    if arch is None:
        raise ValueError(f"'{name}' does not start with {PREFIX}")
    if arch not in ZOO:
        close = difflib.get_close_matches(arch, ZOO, n=1)
        hint = f" (did you mean '{PREFIX}{close[0]}'?)" if close else ""
        raise UnknownNameError(
            f"unknown CIFAR KD zoo model '{name}'{hint}; known: {', '.join(PREFIX + n for n in ZOO)}"
        )
    return arch


def build(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> nn.Module:
    """`cifar:<name>` built for `num_classes` (the registry's build signature).

    `image_size` needs no change to the model (adaptive pooling, see the module docstring);
    width and channels are the benchmark's, anything else is a ConfigError.
    """
    arch = arch_of(name)
    if width != 1.0:
        raise ConfigError(
            f"model '{name}' is the benchmark's architecture as published, so width={width:g} has no meaning; "
            f"set teacher.width=1.0 (or student.width=1.0, whichever names '{name}') and pick a smaller zoo model by name"
        )
    if in_channels != 3:
        raise ConfigError(
            f"model '{name}' takes 3-channel images (the CIFAR-100 benchmark's), but the dataset has {in_channels}; "
            f"use a 3-channel dataset or a model of common.models (e.g. resnet9)"
        )
    del image_size  # any size: the pools are adaptive
    return ZOO[arch](num_classes=num_classes)


__all__ = ["BASELINE_LAYERS", "PREFIX", "ZOO", "arch_of", "build", "split_name"]
