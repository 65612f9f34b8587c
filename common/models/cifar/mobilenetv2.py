"""The CIFAR-100 KD benchmark's MobileNetV2: RepDistiller's `mobile_half` (expansion 6, width 0.5).

Layout of RepDistiller@b84f547 `models/mobilenetv2.py` (mdistiller's `mobilenetv2.py` is the same),
so the public checkpoints load as they are: stem `conv1` (Conv3x3 stride 2-BN-ReLU), seven stages
`blocks.0..6` of InvertedResiduals, `conv2` (Conv1x1 -> 1280-BN-ReLU), `classifier.0` (Linear).

It is not the paper's MobileNetV2 (common/models/mobilenetv2.py): ReLU, not ReLU6; a stride-2 stem
and stride 1 in the second stage (t=6, c=24); the t=1 block keeps its 1x1 expansion conv; channels
are int(c * 0.5) (no rounding to multiples of 8), and the last conv stays 1280 wide.

The reference pools with AvgPool2d(input_size // 16, ceil_mode=True), a 2x2 window sized for 32 px
inputs; here AdaptiveAvgPool2d(1), the same global mean at 32 px, which also lets 64 px inputs
through (the reference's 2x2 window would leave a 2x2 map there and break the classifier).

Sequential (common/layers/hooks.py): conv1, blocks, conv2, avgpool, flatten, classifier run in order.
Generalized layers (METHOD 4.1): the stem ReLU, every InvertedResidual, the conv2 ReLU, the
Flatten: 20, the same partition as the paper's MobileNetV2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.models.chain import init_norm_or_linear

# (expansion t, channels c, repeats n, first stride s), RepDistiller's table with T = 6.
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
WIDTH = 0.5  # "half"
STEM_CHANNELS = 32
LAST_CHANNELS = 1280  # kept at 1280 for widths <= 1, as the reference

# The reference's is_feat stages end after blocks 1, 2, 4 and 6 (f1..f4): InvertedResiduals
# 3, 6, 13 and 17 (generalized layer 0 is the stem). METHOD 4.2's CNN rule: last block of each.
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {"MobileNetV2": (3, 6, 13, 17)}


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, depthwise 3x3-BN-ReLU, 1x1 project-BN (linear); residual add iff
    stride 1 and in == out. Atomic generalized layer (its output is after the add)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 at width 0.5; see the module docstring.

    Init as the reference's: conv N(0, sqrt(2 / (k*k*out_channels))), BN 1/0, Linear N(0, 0.01)/0.
    """

    def __init__(self, *, num_classes: int, width: float = WIDTH) -> None:
        super().__init__()
        current = int(STEM_CHANNELS * width)
        self.conv1 = conv_bn_relu(3, current, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            channels = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(current, channels, s if i == 0 else 1, t))
                current = channels
            self.blocks.append(nn.Sequential(*stage))
        last = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(current, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            else:
                init_norm_or_linear(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The children in registration order, the ModuleList's stages one after another: this is
        # what common.layers.hooks.linearize lists.
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


def mobile_half(*, num_classes: int) -> CifarMobileNetV2:
    """RepDistiller's `mobile_half`: MobileNetV2 with T = 6, width 0.5 (0.81 M parameters at 100 classes)."""
    return CifarMobileNetV2(num_classes=num_classes)


BUILDERS = {"MobileNetV2": mobile_half}
