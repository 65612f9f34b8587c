"""The CIFAR-100 KD benchmark's VGGs with BatchNorm: vgg8, vgg11, vgg13, vgg16, vgg19.

Layout of RepDistiller@b84f547 `models/vgg.py` (mdistiller's `models/cifar/vgg.py` is the same),
so the public `cifar_teachers` checkpoints load as they are: five conv blocks `block0..block4`,
each a Sequential of Conv3x3(bias)-BN-ReLU with its last ReLU left out, and one Linear
`classifier` (512 -> classes). Unlike torchvision's VGG there is no 4096-wide MLP head.

Forward, as the reference's: ReLU after every block, MaxPool(2, 2) after blocks 0-2, a fourth
max-pool after block 3 only for 64 px inputs (`if h == 64: pool3`), so block 3 and block 4 both
give 4x4 maps at 32 px; then global average pool, flatten, classifier.

The model is *sequential* (common/layers/hooks.py): the block-ending ReLUs, the pools and the Flatten
are registered as parameter-free children in forward order, which leaves the state-dict keys
untouched. Generalized layers (METHOD 4.1 rule 2, as for the paper's VGGs): every conv ReLU,
then the Flatten; the head is the classifier Linear.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from common.models.chain import ChainModel, init_norm_or_linear

# Conv widths per block (RepDistiller's cfg "S", "A", "B", "D", "E").
BLOCK_WIDTHS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _stage_ends(widths: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Generalized-layer index of the ReLU ending blocks 1-4 (conv ReLUs are numbered in order).

    METHOD 4.2's CNN rule: the last layer of each stage, leaving out the first (stem-like) one,
    as the paper's VGG lists do. The stages are the reference's `is_feat` features f1..f4, which
    are the outputs of blocks 1-4 (blocks 3 and 4 share a resolution at 32 px but are separate
    features in the benchmark's feature-KD baselines).
    """
    ends, count = [], 0
    for block in widths:
        count += len(block)
        ends.append(count - 1)
    return tuple(ends[1:])


BASELINE_LAYERS: dict[str, tuple[int, ...]] = {name: _stage_ends(w) for name, w in BLOCK_WIDTHS.items()}


class PoolAt64(nn.Module):
    """MaxPool(2, 2) only where the reference applies `pool3`: on a 64 px input, whose map is
    8x8 here after three halvings. At 32 px (4x4 here) it passes the map on, as the reference.

    A leaf on purpose: common.layers.hooks.linearize expands user modules with children, which would
    list a bare, unconditional MaxPool2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, 2) if x.shape[-2] == 8 else x


def conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Conv3x3(bias)-BN-ReLU per width, without the last ReLU (the reference applies it outside,
    so the keys are `0, 1, 3, 4, ...`)."""
    layers: list[nn.Module] = []
    for channels in widths:
        layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=False)]
        in_channels = channels
    return nn.Sequential(*layers[:-1])


class CifarVGG(ChainModel):
    """RepDistiller's CIFAR VGG-BN; see the module docstring.

    The final pool is AdaptiveAvgPool2d(1), as in the reference (a 4x4 map at 32 and 64 px).
    Init as the reference's `_initialize_weights` (it matters for vgg8 students trained from
    scratch): conv N(0, sqrt(2 / (k*k*out_channels))) with zero bias, BN 1/0, Linear N(0, 0.01)/0.
    """

    def __init__(self, widths: tuple[tuple[int, ...], ...], *, num_classes: int) -> None:
        super().__init__()
        current = 3
        for i, block in enumerate(widths):
            self.add_module(f"block{i}", conv_block(current, block))
            self.add_module(f"relu{i}", nn.ReLU(inplace=False))
            if i < 3:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
            elif i == 3:
                self.add_module("pool3", PoolAt64())
            current = block[-1]
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(current, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            else:
                init_norm_or_linear(m)


def _builder(name: str):
    def build(*, num_classes: int) -> CifarVGG:
        return CifarVGG(BLOCK_WIDTHS[name], num_classes=num_classes)

    build.__name__ = name
    build.__doc__ = f"RepDistiller's {name} (BN), {sum(map(len, BLOCK_WIDTHS[name]))} convs + Linear."
    return build


BUILDERS = {name: _builder(name) for name in BLOCK_WIDTHS}
