"""Projected-MSE feature KD (METHOD 8.2, 8.3, 8.8, 9): the FitNet family, ours and its ablations.

| preset       | paper label   | teacher layers       | mapping | KD   | detach head |
|--------------|---------------|----------------------|---------|------|-------------|
| fitnet       | Base FKD      | baseline             | one2one | T=4  | no          |
| fitnet_nokd  | Base FKD-KL   | baseline             | one2one | -    | no          |
| fitnet_fc    | Base FKD+FC   | baseline             | full    | T=4  | no          |
| stl_seplin   | Base FKD-LL   | baseline             | one2one | -    | yes         |
| ours         | Ours          | selected by Q        | one2one | -    | yes         |
| ours+ce      | Ours+CE       | selected by Q        | one2one | -    | no          |
| ours+ce+kd   | Ours+LL       | selected by Q        | one2one | T=4  | no          |
| ours_s/_i/_e/_sqrtie | S/I/E Only, No S | selected by S/I/E/sqrtIE | one2one | - | yes |

All use bias-free 1x1 conv projectors student -> teacher channels, CE weight 1 and feature
weight 1; student layers are the student's baseline list.
"""
from __future__ import annotations

import torch
from torch import nn

from common.methods.losses import feature_mse, fkd_loss
from common.methods.base import FEATURE_BASE, FEATURE_LOSSES, KD_T4, FeatureContext, Pair, Step, register_method
from common.methods.projectors import PairAdapter


class ProjectedMSETerm(nn.Module):
    """L_FKD = (1/n_s) sum_pairs w * mean_b mean_elements (P(pool F_s) - pool F_t)^2 (METHOD 8.2)."""

    def __init__(self, context: FeatureContext) -> None:
        super().__init__()
        self.pairs: list[Pair] = context.pairs
        self.n_student_layers = len(context.student_layers)
        self.adapters = nn.ModuleList(
            PairAdapter(
                context.student_shapes[p.student], context.teacher_shapes[p.teacher],
                context.spec.projector, context.label(p),
            )
            for p in self.pairs
        )

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: Step | None = None) -> torch.Tensor:
        losses = [feature_mse(*adapter(student[p.student], teacher[p.teacher])) for p, adapter in zip(self.pairs, self.adapters)]
        return fkd_loss(losses, [p.weight for p in self.pairs], self.n_student_layers)


FEATURE_LOSSES.register("mse", ProjectedMSETerm)

# Feature weight 1 on the baseline layers is the paper under study's "Base FKD" (METHOD 9). FitNets
# (Romero et al. 2015) train one hint layer in a separate stage before KD; the CRD benchmark
# (RepDistiller `--distill hint -b 100`) trains that one hint at weight 100 jointly with CE.
register_method(**{**FEATURE_BASE, **KD_T4, "name": "fitnet"}, summary='the paper\'s "Base FKD": projected MSE (weight 1) on the baseline layers + CE + KD')
register_method(**{**FEATURE_BASE, "name": "fitnet_nokd"}, summary='"Base FKD-KL": fitnet without KD')
register_method(**{**FEATURE_BASE, **KD_T4, "name": "fitnet_fc", "mapping": "full"}, summary='"Base FKD+FC": fitnet over all teacher x student layer pairs')
register_method(**{**FEATURE_BASE, "name": "stl_seplin", "detach_head": True}, summary='"Base FKD-LL": logit-free training on the baseline layers')

# "selected": stage 1's selection (profile.criterion, Q by default, or profile.layers); the
# ablations name their criterion and take its top-k from the same profile (METHOD 9 "Ours-*").
OURS = {**FEATURE_BASE, "name": "ours", "teacher_layers": "selected", "detach_head": True}
register_method(**OURS, summary="the paper's method: feature losses only on the top-k Q layers (k = 4), head by CE on detached features")
register_method(**{**OURS, "name": "ours+ce", "detach_head": False}, summary='"Ours+CE": ours with CE reaching the backbone')
register_method(**{**OURS, **KD_T4, "name": "ours+ce+kd", "detach_head": False}, summary='"Ours+LL": ours with CE and KD reaching the backbone')
for _suffix, _criterion in {"s": "S", "i": "I", "e": "E", "sqrtie": "sqrtIE"}.items():
    register_method(**{**OURS, "name": f"ours_{_suffix}", "teacher_layers": _criterion}, summary=f"ablation: ours on the top-k layers by {_criterion} alone")
