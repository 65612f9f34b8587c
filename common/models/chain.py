"""The base class of every model here: forward = its child modules applied in order."""
from __future__ import annotations

import torch
from torch import nn


class ChainModel(nn.Module):
    """A model whose forward is exactly its children in registration order.

    common/layers.py relies on this: the linearised module list replays the forward, so a forward
    can be continued from any generalized layer (detached head, SimKD's teacher head).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x
