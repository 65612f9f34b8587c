"""Logit KD baselines (METHOD 8.4, 9): vanilla KD and logit-standardised KD, T = 4, weight 16."""
from __future__ import annotations

from common.methods.base import KD_T4, NO_FEATURES, register_method

# CE weight 1 + KL weight 16 is the paper under study's VKD (METHOD 9); the CRD benchmark
# (RepDistiller) weighs the same KL terms 0.1 CE + 0.9 KD, a different (smaller-KD) balance.
register_method(**{**NO_FEATURES, **KD_T4, "name": "kd"}, summary='vanilla KD (Hinton et al. 2015), the paper\'s "Van. KD": CE + 16 x KL at T 4')
register_method(**{**NO_FEATURES, **KD_T4, "name": "kd_std", "kd_standardize": True}, summary='logit-standardised KD, the paper\'s "Van. KD Std.": as kd on z-scored logits')
