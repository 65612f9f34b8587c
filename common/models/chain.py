"""The base class of every model here: forward = its child modules applied in order."""
from __future__ import annotations

import torch
from torch import nn


class ChainModel(nn.Module):
    """A model whose forward is exactly its children in registration order.

    common/layers/hooks.py relies on this: the linearised module list replays the forward, so a forward
    can be continued from any generalized layer (detached head, SimKD's teacher head).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def init_norm_or_linear(m: nn.Module) -> None:
    """BatchNorm weight 1 / bias 0; Linear ~ N(0, 0.01), bias 0 (VGG and MobileNetV2, METHOD 3.2-3.3).

    Called per module inside the model's own init loop, so the RNG is drawn in module order.
    """
    if isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.zeros_(m.bias)
