"""Logit KD baselines (METHOD 8.4, 9): vanilla KD and logit-standardised KD, T = 4, weight 16."""
from __future__ import annotations

from common.methods.base import KD_T4, NO_FEATURES, register_method

register_method(**{**NO_FEATURES, **KD_T4, "name": "kd"})  # "Van. KD"
register_method(**{**NO_FEATURES, **KD_T4, "name": "kd_std", "kd_standardize": True})  # "Van. KD Std."
