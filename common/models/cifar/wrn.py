"""The wide ResNets of the KD benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (RepDistiller wrn.py).

Layout as the published checkpoints: conv1, blockS.layer.B.{bn1,conv1,bn2,conv2,convShortcut},
bn1, fc. Pre-activation blocks (BN-ReLU-conv twice, no ReLU after the sum); the network ends
with BN-ReLU, average pool, Linear.

Sequential in the project's sense (METHOD 4.1): the final ReLU, the pool and a Flatten are
registered modules (no parameters). The pool is `AdaptiveAvgPool2d(1)` where the reference calls
`F.avg_pool2d(out, 8)`: identical on the 8x8 maps of 32-px inputs, and 64-px inputs (Tiny
ImageNet) pool their 16x16 maps. The stem is a plain conv (no BN/ReLU), so it is marked a
generalized layer itself (`StemConv`), as RepDistiller returns its output as the first feature.

Generalized layers: 0 stem conv, 1..3n blocks (n = (depth - 4) / 6), 3n+1 the final ReLU
(METHOD 4.1 rule 2: every ReLU is a boundary), 3n+2 Flatten. The `is_feat` stage outputs are
layers (0, n, 2n, 3n) (block outputs before the final BN) and the pooled vector.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.models.chain import ChainModel


class StemConv(nn.Conv2d):
    """The first convolution; a generalized layer of its own (its output is a stage feature)."""

    is_generalized_layer = True


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, + shortcut.

    When the channel count changes, the first BN-ReLU is shared with the 1x1 shortcut conv (it
    sees the activated input), else the shortcut is the raw input: the reference's `equalInOut`.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        if self.equal_in_out and stride != 1:
            raise ValueError("a WRN block that keeps its channels keeps its resolution")
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: `layer`, a Sequential of blocks (the name the checkpoints' keys carry)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ChainModel):
    """WRN-depth-k: stem conv 16, three stages of n blocks of 16k/32k/64k channels (strides 1/2/2)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth {depth} is not 6n + 4")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = StemConv(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels[3], num_classes)
        # The reference's init: Kaiming-normal (fan_out) convs, BN 1/0, Linear bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


def _builder(depth: int, widen_factor: int) -> Callable[..., nn.Module]:
    def build(num_classes: int) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes)

    return build


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    f"wrn_{d}_{k}": _builder(d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
}

# METHOD 4.2's CNN rule: the last block of each stage, the reference's is_feat f1..f3
# (generalized layer 0 is the stem conv, then n = (depth - 4) / 6 blocks per stage).
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {
    f"wrn_{d}_{k}": tuple(s * (d - 4) // 6 for s in (1, 2, 3)) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
}
