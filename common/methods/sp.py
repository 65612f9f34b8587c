"""Similarity-preserving KD (METHOD 8.6, section 0 item 7): whole B x B cosine matrices, + CE + KD."""
from __future__ import annotations

import torch
from torch import nn

from common.losses import fkd_loss, similarity_preserving_loss
from common.methods.base import FEATURE_BASE, FEATURE_LOSSES, KD_T4, FeatureContext, Pair, register_method


class SimilarityPreservingTerm(nn.Module):
    """Per pair `similarity_preserving_loss` on the raw features (no projector), reduced like 8.2."""

    def __init__(self, pairs: list[Pair], n_student_layers: int) -> None:
        super().__init__()
        self.pairs = pairs
        self.n_student_layers = n_student_layers

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        losses = [similarity_preserving_loss(student[p.student], teacher[p.teacher]) for p in self.pairs]
        return fkd_loss(losses, [p.weight for p in self.pairs], self.n_student_layers)


@FEATURE_LOSSES.register("sp")
def build_sp(context: FeatureContext) -> nn.Module:
    return SimilarityPreservingTerm(context.pairs, len(context.student_layers))


register_method(**{**FEATURE_BASE, **KD_T4, "name": "sp", "feature_loss": "sp", "projector": "none"})  # "Sim. Pres."
