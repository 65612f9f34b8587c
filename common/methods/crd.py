"""Contrastive representation distillation (Tian et al., ICLR 2020) as presets: `crd`, `crd+kd`.

CE (weight 1) + 0.8 x CRD on the penultimate features (the last generalized layer of teacher and
student, the vector the head reads; RepDistiller's feat[-1]): both embedded to 128-d and L2
normalised, NCE against 16 384 negatives from a momentum memory bank (T 0.07, momentum 0.5).
`crd` is the CRD table's "CRD" row (no KD, RepDistiller `-a 0 -b 0.8`); `crd+kd` adds KD at
T = 4 with RepDistiller's weight 1 on its T^2-scaled KL, i.e. 16 in this tool's kd_weight units
(`-a 1 -b 0.8`). Sources of every value in crd_loss.py.

The memory bank holds one entry per training row (`train_rows`, passed by stage 2); negatives
come from the rows of other classes ("exact" mode), drawn with torch's global generator, so a
seed fixes them and a resumed run continues the same stream. Under torchrun each rank keeps its
own bank, updated from its own shard (the reference trains on one GPU).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.errors import ConfigError
from common.methods.base import FEATURE_BASE, FEATURE_LOSSES, FeatureContext, Step, register_method
from common.methods.crd_loss import CRD_CE_WEIGHT, CRD_KD_T, CRD_PLUS_KD_KD_WEIGHT, CRD_WEIGHT, CRDLoss, NegativeSampler


class CRDTerm(nn.Module):
    """`CRDLoss` on the one (student, teacher) pair, with negatives drawn per batch from the
    training rows of other classes."""

    def __init__(self, context: FeatureContext) -> None:
        super().__init__()
        if len(context.pairs) != 1:
            raise ConfigError(
                f"crd distils one layer pair (the penultimate features), got {len(context.pairs)}; "
                "set method.teacher_layers=[-1] method.student_layers=[-1]"
            )
        if context.train_rows is None or context.train_labels is None:
            raise ValueError("crd keeps a memory bank per training row: pass train_rows= and train_labels= to build_distiller")
        (s_shape, t_shape) = (context.student_shapes[0], context.teacher_shapes[0])
        rows = torch.as_tensor(context.train_rows, dtype=torch.long)
        labels = torch.as_tensor(context.train_labels, dtype=torch.long)
        # dataset row -> position in the bank (-1: not a training row)
        position = torch.full((len(labels),), -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows))
        self.register_buffer("position", position, persistent=False)
        self.host_position = position  # for check_rows, which must not read the device
        self.n_negatives = context.spec.crd_negatives
        self.negatives = NegativeSampler(labels[rows], self.n_negatives)
        self.loss = CRDLoss(math.prod(s_shape), math.prod(t_shape), len(rows), n_negatives=self.n_negatives)

    def check_rows(self, rows: torch.Tensor) -> None:
        """Raise unless every dataset row a run draws batches from has a row in the memory bank.

        Checked once, on the host, when the loop sets up (Distiller.check_rows): per batch it was
        a host read per step, which drains a GPU's queue (issue 19).
        """
        rows = rows.reshape(-1).long().cpu()
        n = self.host_position.numel()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ValueError(f"crd: dataset rows must lie in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
        outside = rows[self.host_position[rows] < 0]
        if outside.numel():
            raise ValueError(
                f"crd got {outside.numel()} batch row(s) outside the training rows its memory bank was built for "
                f"(e.g. row {int(outside[0])}); build the distiller with the run's train_rows"
            )

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: Step | None = None) -> torch.Tensor:
        if step is None:
            raise ValueError("crd needs the batch's dataset rows: pass step= to forward_train")
        idx = self.position[step.indices.to(self.position.device)]  # rows were checked once (check_rows)
        contrast = self.negatives(idx)
        return self.loss(student[0].flatten(1).float(), teacher[0].flatten(1).float(), idx, contrast)


FEATURE_LOSSES.register("crd", CRDTerm)

CRD = {**FEATURE_BASE, "name": "crd", "feature_loss": "crd", "feature_weight": CRD_WEIGHT, "ce_weight": CRD_CE_WEIGHT,
       "teacher_layers": (-1,), "student_layers": (-1,), "projector": "none"}
register_method(**CRD, summary="CRD (Tian et al. 2020): CE + 0.8 x contrastive loss on the penultimate features, 16 384 negatives, no KD")
register_method(
    **{**CRD, "name": "crd+kd", "kd_weight": CRD_PLUS_KD_KD_WEIGHT * CRD_KD_T**2, "kd_temperature": CRD_KD_T},
    summary="CRD+KD (Tian et al. 2020): crd plus KD at T 4 (RepDistiller's weight 1 on the T^2-scaled KL)",
)
