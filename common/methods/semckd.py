"""SemCKD-like baseline (METHOD 8.6): learned per-sample attention over all (student, teacher) pairs.

For every distilled layer the raw batch Gram matrix (B x B, un-normalised, item 12.15) goes
row by row through an MLP Linear(B, 256)-LeakyReLU-Linear(256, 128)-LeakyReLU-L2-normalise (one
MLP per student layer: queries; one per teacher layer: keys). w_b[s, t] = softmax_t <q_b^s, k_b^t>;
the loss is `semckd_loss` over the per-sample MSEs of all pairs, each with its own three-layer
projector. Plus CE + vanilla KD.

The MLP input width is the batch size, so the term is built for the configured batch size
(`build_distiller(..., batch_size=...)`) and every training batch must have exactly that many
samples: the training loader must drop the last partial batch (as the reference does).
Evaluation never uses the attention, so eval batches may have any size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError, TrainingError
from common.methods.losses import batch_gram, feature_mse_per_sample, semckd_attention, semckd_loss
from common.methods.base import FEATURE_BASE, FEATURE_LOSSES, KD_T4, FeatureContext, Step, register_method
from common.methods.projectors import PairAdapter

MLP_DIMS = (256, 128)  # hidden and output width of the attention MLPs (reference: [256, 128])


class _L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def attention_mlp(batch_size: int) -> nn.Sequential:
    hidden, out = MLP_DIMS
    return nn.Sequential(
        nn.Linear(batch_size, hidden), nn.LeakyReLU(), nn.Linear(hidden, out), nn.LeakyReLU(), _L2Normalize()
    )


class SemCKDTerm(nn.Module):
    def __init__(self, context: FeatureContext) -> None:
        super().__init__()
        if context.batch_size is None:
            raise ConfigError("method semckd needs the training batch size: pass batch_size= to build_distiller")
        self.batch_size = context.batch_size
        self.n_student, self.n_teacher = len(context.student_layers), len(context.teacher_layers)
        self.pairs = context.pairs  # student-major: pair index = s * n_teacher + t
        self.adapters = nn.ModuleList(
            PairAdapter(context.student_shapes[p.student], context.teacher_shapes[p.teacher], context.spec.projector, context.label(p))
            for p in self.pairs
        )
        self.queries = nn.ModuleList(attention_mlp(self.batch_size) for _ in range(self.n_student))
        self.keys = nn.ModuleList(attention_mlp(self.batch_size) for _ in range(self.n_teacher))

    def attention(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample weights (B, n_s, n_t) from the Gram rows of every layer."""
        queries = torch.stack([mlp(batch_gram(f)) for mlp, f in zip(self.queries, student)], dim=1)
        keys = torch.stack([mlp(batch_gram(f)) for mlp, f in zip(self.keys, teacher)], dim=1)
        return semckd_attention(queries, keys)

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], step: Step | None = None) -> torch.Tensor:
        batch = student[0].shape[0]
        if batch != self.batch_size:
            raise TrainingError(
                f"semckd was built for batches of {self.batch_size} but got {batch}; "
                "drop the last partial training batch (drop_last=True) or set train.batch_size to match"
            )
        pair_losses = torch.stack(
            [feature_mse_per_sample(*adapter(student[p.student], teacher[p.teacher])) for p, adapter in zip(self.pairs, self.adapters)],
            dim=1,
        ).reshape(batch, self.n_student, self.n_teacher)
        return semckd_loss(pair_losses, self.attention(student, teacher))


FEATURE_LOSSES.register("semckd", SemCKDTerm)

# Feature weight 1 + CE + KD (T 4, 16) is the paper under study's SemCKD-like baseline (METHOD 9);
# SemCKD itself (Chen et al. AAAI 2021, its scripts: -r 1 -a 1 -b 400) weighs the attention loss 400.
register_method(
    **{**FEATURE_BASE, **KD_T4, "name": "semckd", "feature_loss": "semckd", "mapping": "full", "projector": "three_layer"},
    summary="the paper's SemCKD-like baseline: attention-weighted MSE (weight 1; SemCKD's own is 400) + CE + KD",
)
