"""ResNet50 of the KD benchmark (RepDistiller resnetv2.py): ImageNet Bottleneck widths, CIFAR stem.

Layout as the published checkpoints: conv1, bn1, layerS.B.{conv1..3, bn1..3}, layerS.B.shortcut.{0,1}
(first block of each stage only), `linear`. Sequential in the project's sense (METHOD 4.1): the
stem ReLU and a Flatten are registered modules (no parameters); the pool is the reference's own
AdaptiveAvgPool2d(1). Generalized layers: 0 stem ReLU, 1..16 Bottlenecks, 17 Flatten; the
`is_feat` stage outputs are layers (0, 3, 7, 13, 16) and the pooled vector.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.models.chain import ChainModel


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride) - 1x1 (4x planes) with BN, + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()  # empty: identity, and no state-dict keys
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetV2(ChainModel):
    """3x3 stride-1 stem of 64 channels, four Bottleneck stages (64/128/256/512 planes, strides
    1/2/2/2), global average pool, Linear(2048)."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        current = 64
        for stage, (n, planes) in enumerate(zip(num_blocks, (64, 128, 256, 512))):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(current, planes, 2 if stage > 0 and i == 0 else 1))
                current = planes * Bottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(current, num_classes)
        # The reference's init: Kaiming-normal (fan_out) convs, BN 1/0 (no zero-init residual).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def resnet50(num_classes: int) -> ResNetV2:
    return ResNetV2((3, 4, 6, 3), num_classes)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"ResNet50": resnet50}

# METHOD 4.2's CNN rule: the last Bottleneck of each stage, the reference's is_feat f1..f4
# (generalized layer 0 is the stem ReLU; stages of 3, 4, 6, 3 blocks).
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {"ResNet50": (3, 7, 13, 16)}
