"""The CIFAR ResNets of the KD benchmark: resnet8..110, resnet8x4, resnet32x4 (RepDistiller resnet.py).

State-dict layout as the published checkpoints (conv1, bn1, layerS.B.{conv1,bn1,conv2,bn2},
layerS.0.downsample.{0,1}, fc), so a `{"model": state_dict}` file loads strictly
(`common.models.cifar.checkpoint`).

Two deliberate differences from the reference code, neither of which changes a parameter or
an output at 32 px:
* the model is *sequential* in the project's sense (forward = children in order, METHOD 4.1):
  the stem ReLU, the average pool and a Flatten are registered modules (no parameters);
* the pool is `AdaptiveAvgPool2d(1)` where the reference has `AvgPool2d(8)`: identical on the
  8x8 maps of 32-px inputs, and 64-px inputs (Tiny ImageNet) pool their 16x16 maps instead of
  giving a 2x2 map the classifier cannot take.

Every block returns relu(out + shortcut), as the reference's blocks do (they also hand back the
pre-ReLU sum, `preact`, which the feature hooks here do not need). Generalized layers: 0 the stem
ReLU, 1..3n the BasicBlocks, 3n+1 the Flatten; the stage outputs RepDistiller returns with
`is_feat=True` are layers (0, n, 2n, 3n) and the pooled vector.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.models.chain import ChainModel


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(ChainModel):
    """3x3 stem of num_filters[0] channels, three stages of n = (depth - 2) / 6 BasicBlocks of
    num_filters[1..3] channels (strides 1, 2, 2), global average pool, Linear."""

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth {depth} is not 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, num_filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        current = num_filters[0]
        for stage, planes in enumerate(num_filters[1:]):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(current, planes, 2 if stage > 0 and i == 0 else 1))
                current = planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(current, num_classes)
        # The reference's init: Kaiming-normal (fan_out) convs, BN 1/0, Linear PyTorch default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


BASE_FILTERS = (16, 16, 32, 64)
X4_FILTERS = (32, 64, 128, 256)  # the "x4" models: 4x the channels of stages 1-3, a 2x stem


def _builder(depth: int, filters: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(num_classes: int) -> CifarResNet:
        return CifarResNet(depth, filters, num_classes)

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": _builder(d, BASE_FILTERS) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _builder(8, X4_FILTERS),
    "resnet32x4": _builder(32, X4_FILTERS),
}
DEPTHS = {name: int(name[len("resnet"):].removesuffix("x4")) for name in BUILDERS}

# METHOD 4.2's CNN rule: the last block of each stage, the reference's is_feat f1..f3
# (generalized layer 0 is the stem ReLU, then n blocks per stage).
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {
    name: tuple(s * (depth - 2) // 6 for s in (1, 2, 3)) for name, depth in DEPTHS.items()
}
