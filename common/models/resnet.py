"""CIFAR-style ResNets with BasicBlocks: ResNet9, ResNet18, ResNet34 (METHOD 3.1).

Module names follow torchvision (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, ..., fc), so
an ImageNet state dict maps directly (common/models/pretrained.py). The model is *sequential*:
`forward` applies the registered children in order (conv1, bn1, relu, [maxpool], layer1..layer4,
avgpool, flatten, fc), which is what common/layers/hooks.py relies on. Generalized layers (METHOD 4.2):
stem ReLU, every BasicBlock, Flatten.
"""
from __future__ import annotations

import torch
from torch import nn

from common.models.chain import ChainModel


def scale_channels(channels: int, width: float) -> int:
    """Width rule: round(channels * width), at least 1 (width 0.25 gives 16/32/64/128)."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (METHOD 3.1). Atomic generalized layer."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(ChainModel):
    """CIFAR-style ResNet: 3x3 stride-1 stem, four BasicBlock stages of widths 64/128/256/512
    (times `width`), strides 1/2/2/2, global average pool, Flatten, Linear (METHOD 3.1).

    The stem max-pool (3, stride 2, pad 1) exists only when image_size > 32, the reference's
    Tiny ImageNet rule. Init: Kaiming-normal (fan_out, relu) convs, BN 1/0, second BN of every
    block zeroed, Linear PyTorch default.
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        *,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        if image_size > 32:
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        current = widths[0]
        for stage, (n_blocks, channels) in enumerate(zip(blocks, widths)):
            stride = 1 if stage == 0 else 2
            layers = []
            for i in range(n_blocks):
                layers.append(BasicBlock(current, channels, stride if i == 0 else 1))
                current = channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(current, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)



def resnet9(**kwargs) -> ResNet:
    """ResNet9: blocks [1, 1, 1, 1]; 6 generalized layers."""
    return ResNet((1, 1, 1, 1), **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet18: blocks [2, 2, 2, 2]; 10 generalized layers (0 stem ReLU, 1-8 blocks, 9 Flatten).

    Not in the paper; its baseline list is the last block of each stage, (2, 4, 6, 8), the same
    rule as ResNet9/ResNet34 (METHOD 4.2).
    """
    return ResNet((2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet34: blocks [3, 4, 6, 3]; 18 generalized layers."""
    return ResNet((3, 4, 6, 3), **kwargs)
