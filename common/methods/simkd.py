"""SimKD-like baseline (METHOD 8.6, section 0 item 7): logits through a reused teacher head.

Feature loss as 8.2 with three-layer projectors on the One2One pairs; the logits are
T_head(P_last(h)), with h the student's last distilled feature, P_last the projector of the last
pair and T_head a *trainable copy* of the teacher's modules after its last distilled generalized
layer (AFTER, not at: the reference re-applied that layer, item 12.14). CE and vanilla KD act on
these logits, and test-time logits take the same path; the student's own head is unused.
The copy follows the distiller's train/eval mode (the reference left it in the teacher's mode).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from common.errors import ConfigError
from common.layers.hooks import forward_with_features, modules_after
from common.method_spec import MethodSpec
from common.methods.base import FEATURE_BASE, KD_T4, BuildContext, Distiller, register_method
from common.methods.projectors import from_channels_first


class SimKDDistiller(Distiller):
    def __init__(self, spec: MethodSpec, student: nn.Module, feature_term: nn.Module | None, context: BuildContext) -> None:
        super().__init__(spec, student, feature_term, context)
        if context.teacher is None:
            raise ValueError(f"method '{spec.name}' reuses the teacher's head: pass teacher= to build_distiller")
        device = next(student.parameters()).device
        self.last_teacher_layer = self.teacher_layers[-1]
        # Only the copy is registered: the teacher's own parameters must stay out of the optimiser.
        self.teacher_head = copy.deepcopy(modules_after(context.teacher, self.last_teacher_layer)).to(device)
        self.teacher_head.requires_grad_(True)
        self.head_input_shape = context.teacher_shapes[-1]
        self._check_head(context)

    def head_logits(self, student_features: list[torch.Tensor]) -> torch.Tensor:
        """T_head(P_last(pool(h))), h = the feature of the last distilled student layer."""
        projected = self.feature_term.adapters[-1].project_student(student_features[-1])
        return self.teacher_head(from_channels_first(projected, self.head_input_shape))

    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        _, features = forward_with_features(self.student, images, self.student_layers)
        ordered = [features[i] for i in self.student_layers]
        return self.head_logits(ordered), ordered

    def forward_eval(self, images: torch.Tensor) -> torch.Tensor:
        return self.student_forward(images)[0]

    def _check_head(self, context: BuildContext) -> None:
        """Dry run on zeros, in eval mode so no BN statistics move: fail at build time, not mid-run."""
        modules = [self.feature_term, self.teacher_head]
        modes = [m.training for m in modules]
        device = next(self.student.parameters()).device
        try:
            for m in modules:
                m.eval()
            with torch.no_grad():
                logits = self.head_logits([torch.zeros(2, *context.student_shapes[-1], device=device)])
        except RuntimeError as exc:
            raise ConfigError(
                f"simkd: the teacher's modules after layer {self.last_teacher_layer} cannot take the projected "
                f"student feature ({str(exc).splitlines()[0]}); pick another last teacher layer"
            ) from None
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if tuple(logits.shape) != (2, context.num_classes):
            raise ConfigError(
                f"simkd: the teacher head gives logits of shape {tuple(logits.shape[1:])}, expected "
                f"({context.num_classes},); the teacher must be trained on the same classes"
            )


# CE + KD (T 4, 16) on the reused-head logits plus feature weight 1 is the paper under study's
# SimKD-like baseline (METHOD 9); SimKD itself (Chen et al. CVPR 2022) trains with the feature
# MSE alone (weight 1, no CE, no KD): method.ce_weight=0 method.kd_weight=0 gives that.
register_method(
    SimKDDistiller, **{**FEATURE_BASE, **KD_T4, "name": "simkd", "projector": "three_layer", "teacher_head": True},
    summary="the paper's SimKD-like baseline: projected MSE + reused teacher head, + CE + KD (SimKD itself: MSE only)",
)
