"""MobileNetV2 for small images (METHOD 3.3); student only, trained from scratch.

Sequential: features (stem, 17 InvertedResiduals, 1x1 conv), avgpool, flatten, classifier,
applied in order. Generalized layers (METHOD 4.2): stem ReLU6, every InvertedResidual, the last
ReLU6, Flatten: 20 in all.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.models.chain import ChainModel, init_norm_or_linear

# (expansion t, channels c, repeats n, first stride s), METHOD 3.3.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Width rule (the reference's): round channels * width *up* to a multiple of 8, at least 8."""
    return max(divisor, int(math.ceil(channels / divisor) * divisor))


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6 when t > 1] - depthwise 3x3-BN-ReLU6 - 1x1 project-BN (linear);
    residual add iff stride 1 and in == out. Atomic generalized layer (output after the add)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=False)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=False),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(ChainModel):
    """MobileNetV2 (METHOD 3.3). Stem Conv3x3-BN-ReLU6 with stride 1 if image_size <= 32 else 2,
    the inverted-residual table, Conv1x1(320 -> 1280)-BN-ReLU6, average pool, Flatten, Linear.

    `width` scales every channel count, stem and 1280 included, by `make_divisible` (width 1 is
    the standard network). Init: conv N(0, sqrt(2 / (k*k*out_channels))) with zero bias, BN 1/0,
    Linear N(0, 0.01)/0.
    """

    def __init__(self, *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        current = make_divisible(STEM_CHANNELS * width)
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, current, 3, 1 if image_size <= 32 else 2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            channels = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(current, channels, s if i == 0 else 1, t))
                current = channels
        last = make_divisible(LAST_CHANNELS * width)
        layers.append(conv_bn_relu6(current, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            else:
                init_norm_or_linear(m)



def mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)
