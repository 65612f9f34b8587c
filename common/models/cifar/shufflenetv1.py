"""The CIFAR-100 KD benchmark's ShuffleNetV1 (`ShuffleV1`: groups 3, widths 240/480/960).

Layout of RepDistiller@b84f547 `models/ShuffleNetv1.py` (mdistiller's is the same), so the public
checkpoints load as they are: stem `conv1` (Conv1x1 3 -> 24, no stride)-`bn1`-ReLU, stages
`layer1..3` of 4, 8, 4 Bottlenecks, `linear`.

Bottleneck (ShuffleNet unit): grouped 1x1 conv to out/4 channels-BN-ReLU, channel shuffle,
depthwise 3x3 (stride s)-BN, grouped 1x1 conv-BN, then ReLU of (branch + x) at stride 1, or of
concat(branch, AvgPool3x3/2(x)) at stride 2, where the branch makes out - in channels so that the
concat has `out`. The first 1x1 conv of the first unit (24 input channels) is ungrouped, and its
shuffle (groups 1) is the identity. The reference's depthwise conv is followed by BN *and ReLU*
(unlike the paper), and so is it here.

The reference ends with F.avg_pool2d(x, 4), sized for the 4x4 map of 32 px inputs; here
AdaptiveAvgPool2d(1), the same at 32 px, which also lets 64 px inputs work.

Sequential (common/layers/hooks.py): the stem ReLU, the pool and the Flatten are parameter-free
children in forward order (the state-dict keys are unchanged). Generalized layers: the stem
ReLU, each Bottleneck, the Flatten: 18.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from common.models.chain import ChainModel

STEM_CHANNELS = 24
OUT_CHANNELS = (240, 480, 960)
NUM_BLOCKS = (4, 8, 4)
GROUPS = 3

# The reference's is_feat stages are layer1..3 (f1..f3): the last Bottleneck of each is
# generalized layer 4, 12 and 16 (layer 0 is the stem ReLU). METHOD 4.2's CNN rule.
BASELINE_LAYERS: dict[str, tuple[int, ...]] = {"ShuffleV1": (4, 12, 16)}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, g*k, H, W) -> channels reordered so that each group's outputs spread over all groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class Bottleneck(nn.Module):
    """ShuffleNetV1 unit; see the module docstring. Atomic generalized layer (output after the ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_channels // 4
        first_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return F.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(ChainModel):
    """RepDistiller's CIFAR ShuffleNetV1; see the module docstring. PyTorch's default init, as the reference."""

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=False)
        current = STEM_CHANNELS
        for stage, (out_channels, n_blocks) in enumerate(zip(OUT_CHANNELS, NUM_BLOCKS)):
            blocks = []
            for i in range(n_blocks):
                # The stride-2 unit concatenates its input, so its branch makes only the rest.
                branch = out_channels - current if i == 0 else out_channels
                blocks.append(Bottleneck(current, branch, 2 if i == 0 else 1, GROUPS))
                current = out_channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(current, num_classes)


def shuffle_v1(*, num_classes: int) -> ShuffleNetV1:
    """RepDistiller's `ShuffleV1` (0.95 M parameters at 100 classes)."""
    return ShuffleNetV1(num_classes=num_classes)


BUILDERS = {"ShuffleV1": shuffle_v1}
