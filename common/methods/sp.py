"""Similarity-preserving KD: the published loss (`sp`) and the reference's variant (`sp_ref`).

`sp` is Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019): CE plus
gamma * sum over layer pairs of ||G~_t - G~_s||_F^2 / b^2, G~ the row-normalised batch Gram matrix
(eq. 1-4). gamma = 3000 is the weight of their CIFAR-10 experiments (section 4.1), which the CRD
benchmark (RepDistiller, `--distill similarity -a 0 -b 3000`) also uses on CIFAR-100, with no
logit KD. RepDistiller applies it to the last feature map only; here the pairs are the baseline
layers, as for every baseline of this tool, and `method.teacher_layers=[...]` narrows them.

`sp_ref` is what the paper under study trained its "Sim. Pres." bars with (METHOD 8.6, 9): the
cosine matrix of L2-normalised features, the mean over the whole B x B matrix, weight 1, plus
CE and KD (T = 4, weight 16); the row-0 slip of its code stays fixed (12.13).
"""
from __future__ import annotations

import torch
from torch import nn

from common.methods.losses import fkd_loss, similarity_preserving_loss, similarity_preserving_ref_loss
from common.methods.base import FEATURE_BASE, FEATURE_LOSSES, KD_T4, FeatureContext, Pair, Step, register_method

SP_GAMMA = 3000.0  # Tung & Mori 2019, section 4.1 (CIFAR-10); RepDistiller's CIFAR-100 runs: -b 3000


class PublishedSPTerm(nn.Module):
    """sum_pairs w_p * `similarity_preserving_loss` (Tung & Mori eq. 4 sums over the pair set I)."""

    def __init__(self, pairs: list[Pair]) -> None:
        super().__init__()
        self.pairs = pairs

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: Step | None = None) -> torch.Tensor:
        return sum(p.weight * similarity_preserving_loss(student[p.student], teacher[p.teacher]) for p in self.pairs)


class ReferenceSPTerm(nn.Module):
    """Per pair `similarity_preserving_ref_loss` on the raw features (no projector), reduced like 8.2."""

    def __init__(self, pairs: list[Pair], n_student_layers: int) -> None:
        super().__init__()
        self.pairs = pairs
        self.n_student_layers = n_student_layers

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: Step | None = None) -> torch.Tensor:
        losses = [similarity_preserving_ref_loss(student[p.student], teacher[p.teacher]) for p in self.pairs]
        return fkd_loss(losses, [p.weight for p in self.pairs], self.n_student_layers)


@FEATURE_LOSSES.register("sp")
def build_sp(context: FeatureContext) -> nn.Module:
    return PublishedSPTerm(context.pairs)


@FEATURE_LOSSES.register("sp_ref")
def build_sp_ref(context: FeatureContext) -> nn.Module:
    return ReferenceSPTerm(context.pairs, len(context.student_layers))


register_method(
    **{**FEATURE_BASE, "name": "sp", "feature_loss": "sp", "projector": "none", "feature_weight": SP_GAMMA},
    summary="similarity-preserving KD as published (Tung & Mori 2019): CE + 3000 x row-normalised Gram loss, no KD",
)
register_method(
    **{**FEATURE_BASE, **KD_T4, "name": "sp_ref", "feature_loss": "sp_ref", "projector": "none"},
    summary='the paper\'s "Sim. Pres.": cosine-matrix MSE (weight 1) + CE + KD (T 4, weight 16)',
)
