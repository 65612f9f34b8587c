"""The CIFAR-100 KD benchmark's ShuffleNetV2 (`ShuffleV2`: net size 1, widths 116/232/464, 1024).

Layout of RepDistiller@b84f547 `models/ShuffleNetv2.py` (mdistiller's is the same), so the public
checkpoints load as they are: stem `conv1` (Conv1x1 3 -> 24, no stride)-`bn1`-ReLU, stages
`layer1..3`, each a DownBlock then 3, 7, 3 BasicBlocks, `conv2` (1x1 -> 1024)-`bn2`-ReLU, `linear`.

BasicBlock: split the channels in halves; the second half goes through 1x1-BN-ReLU, depthwise
3x3-BN, 1x1-BN-ReLU; concat(first half, that), channel shuffle with 2 groups.
DownBlock (stride 2, out channels split in halves): left = depthwise 3x3/2-BN, 1x1-BN-ReLU;
right = 1x1-BN-ReLU, depthwise 3x3/2-BN, 1x1-BN-ReLU; concat(left, right), shuffle with 2 groups.

The reference ends with F.avg_pool2d(x, 4), sized for the 4x4 map of 32 px inputs; here
AdaptiveAvgPool2d(1), the same at 32 px, which also lets 64 px inputs work.

Sequential (common/layers/hooks.py): the ReLUs, the pool and the Flatten are parameter-free children in
forward order (the state-dict keys are unchanged). DownBlock's class name is not one METHOD 4.1
lists, so it carries `is_generalized_layer`. Generalized layers: the stem ReLU, each DownBlock and
BasicBlock, the conv2 ReLU, the Flatten: 19.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from common.models.chain import ChainModel

STEM_CHANNELS = 24
OUT_CHANNELS = (116, 232, 464)
NUM_BLOCKS = (3, 7, 3)  # BasicBlocks after each stage's DownBlock
LAST_CHANNELS = 1024

# The reference's is_feat stages are layer1..3 (f1..f3): the last block of each is generalized
# layer 4, 12 and 16 (layer 0 is the stem ReLU). METHOD 4.2's CNN rule.
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {"ShuffleV2": (4, 12, 16)}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """(N, g*k, H, W) -> interleave the g groups' channels, so the halves mix in the next block."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    """ShuffleNetV2 stride-1 unit; see the module docstring. Atomic generalized layer (output after the shuffle)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], 1))


class DownBlock(nn.Module):
    """ShuffleNetV2 stride-2 unit; see the module docstring. Generalized layer (output after the shuffle)."""

    is_generalized_layer = True

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(ChainModel):
    """RepDistiller's CIFAR ShuffleNetV2; see the module docstring. PyTorch's default init, as the reference."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu1 = nn.ReLU(inplace=False)
        current = STEM_CHANNELS
        for stage, (out_channels, n_blocks) in enumerate(zip(OUT_CHANNELS, NUM_BLOCKS)):
            blocks: list[nn.Module] = [DownBlock(current, out_channels)]
            blocks += [BasicBlock(out_channels) for _ in range(n_blocks)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            current = out_channels
        self.conv2 = nn.Conv2d(current, LAST_CHANNELS, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(LAST_CHANNELS)
        self.relu2 = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(LAST_CHANNELS, num_classes)


def shuffle_v2(*, num_classes: int) -> ShuffleNetV2:
    """RepDistiller's `ShuffleV2` (1.36 M parameters at 100 classes)."""
    return ShuffleNetV2(num_classes=num_classes)


BUILDERS = {"ShuffleV2": shuffle_v2}
