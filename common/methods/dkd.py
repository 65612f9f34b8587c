"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) as a preset: `dkd`.

CE (weight 1) + warm-up(epoch) x (alpha TCKD + beta NCKD) at T = 4, alpha = 1, beta per pair
(the DKD paper's CIFAR-100 configs, `dkd_loss.DKD_BETA`; 8 elsewhere), a 20-epoch linear
warm-up; all from mdistiller's configs (sources in dkd_loss.py). `kd_weight` scales the whole
DKD term (1 here: the term carries its own T^2). The formulas are in dkd_loss.py; the Distiller
applies them when `logit_loss` is "dkd" (common/methods/base.py).
"""
from __future__ import annotations

from common.methods.base import NO_FEATURES, register_method
from common.methods.dkd_loss import DKD_ALPHA, DKD_CE_WEIGHT, DKD_T, DKD_WARMUP_EPOCHS

register_method(
    **{**NO_FEATURES, "name": "dkd", "logit_loss": "dkd", "ce_weight": DKD_CE_WEIGHT, "kd_weight": 1.0,
       "kd_temperature": DKD_T, "dkd_alpha": DKD_ALPHA, "dkd_beta": None, "dkd_warmup": DKD_WARMUP_EPOCHS},
    summary="decoupled KD (Zhao et al. 2022): CE + TCKD + beta x NCKD at T 4, beta per pair (8 by default), 20-epoch warm-up",
)
