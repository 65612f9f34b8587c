"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

The paper rewrites classical KD on one sample with target class t as

    KD = TCKD + (1 - p_t^T) * NCKD

where TCKD = KL(b^T || b^S) is the KL of the binary "target vs. all the rest" distributions
b = [p_t, 1 - p_t], NCKD = KL(p^^T || p^^S) the KL among the non-target classes only (the softmax
renormalised over the classes j != t), and p_t^T the teacher's target probability. KD's weight
(1 - p_t^T) on NCKD shrinks exactly where the teacher is confident; DKD decouples the two terms:

    DKD = alpha * TCKD + beta * NCKD.

Everything here follows the reference implementation, megvii-research/mdistiller
`mdistiller/distillers/DKD.py` (commit e8c5bb3): softmax at temperature T, each KL summed over
its classes, times T^2, divided by the batch size (a batch mean of per-sample sums). The loss of
the distillation term is scaled by `dkd_warmup(epoch)`; cross-entropy is added at DKD_CE_WEIGHT.

Two places differ in arithmetic, not in value: TCKD takes the binary log-probabilities from
log-sum-exps (mdistiller: `log` of summed softmax probabilities, which gives log(0) = -inf once
the non-target mass underflows), and the teacher's distributions enter the KL as
log-probabilities. The teacher's logits are detached: the teacher is the fixed target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.methods.losses import full_precision

# ----------------------------------------------------------------------------- defaults
# All from mdistiller `mdistiller/engine/cfg.py` (commit a08d46f), section CFG.DKD.
DKD_CE_WEIGHT = 1.0  # CFG.DKD.CE_WEIGHT: weight of cross-entropy beside the DKD term
DKD_ALPHA = 1.0  # CFG.DKD.ALPHA: weight of TCKD
DKD_BETA_DEFAULT = 8.0  # CFG.DKD.BETA: weight of NCKD where a pair's config does not set one
DKD_T = 4.0  # CFG.DKD.T: temperature
DKD_WARMUP_EPOCHS = 20  # CFG.DKD.WARMUP: epochs of linear warm-up of the DKD term

# DKD.py subtracts 1000 * (one-hot target) from z / T before the NCKD softmax, so that the
# target class gets probability exp(-1000 - ...) = 0 in float32 and float64 alike.
NCKD_MASK = 1000.0

# beta of NCKD per CIFAR-100 teacher -> student pair of the DKD paper's tables, as set in
# mdistiller `configs/cifar100/dkd/<file>.yaml` (commit e8c5bb3). Names as in the `cifar:` zoo.
# "(default)": the yaml sets no DKD.BETA, so CFG.DKD.BETA = 8.0 applies. alpha = 1 and T = 4 in all.
DKD_BETA: dict[tuple[str, str], float] = {
    ("resnet56", "resnet20"): 2.0,  # res56_res20.yaml DKD.BETA
    ("resnet110", "resnet32"): 2.0,  # res110_res32.yaml DKD.BETA
    ("resnet32x4", "resnet8x4"): 8.0,  # res32x4_res8x4.yaml (default)
    ("wrn_40_2", "wrn_16_2"): 6.0,  # wrn40_2_wrn_16_2.yaml DKD.BETA
    ("wrn_40_2", "wrn_40_1"): 6.0,  # wrn40_2_wrn_40_1.yaml DKD.BETA
    ("vgg13", "vgg8"): 6.0,  # vgg13_vgg8.yaml DKD.BETA
    ("vgg13", "MobileNetV2"): 6.0,  # vgg13_mv2.yaml DKD.BETA
    ("ResNet50", "MobileNetV2"): 8.0,  # res50_mv2.yaml (default)
    ("resnet32x4", "ShuffleV1"): 8.0,  # res32x4_shuv1.yaml (default)
    ("resnet32x4", "ShuffleV2"): 8.0,  # res32x4_shuv2.yaml (default)
    ("wrn_40_2", "ShuffleV1"): 8.0,  # wrn40_2_shuv1.yaml (default)
}

def dkd_beta(teacher: str, student: str) -> float:
    """beta for a teacher -> student pair: DKD_BETA's value, else DKD_BETA_DEFAULT (8).

    Names with or without the `cifar:` prefix.
    """
    teacher, student = (name.removeprefix("cifar:") for name in (teacher, student))
    return DKD_BETA.get((teacher, student), DKD_BETA_DEFAULT)


# ----------------------------------------------------------------------------- the terms


def _check(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor) -> None:
    if logits_s.ndim != 2 or logits_s.shape != logits_t.shape:
        raise ValueError(f"logits must be (B, C) and alike, got {tuple(logits_s.shape)} and {tuple(logits_t.shape)}")
    if logits_s.shape[1] < 2:
        raise ValueError(f"DKD needs at least 2 classes (a target and a non-target), got {logits_s.shape[1]}")
    if target.shape != logits_s.shape[:1]:
        raise ValueError(f"target must be (B,) = ({logits_s.shape[0]},), got {tuple(target.shape)}")


def target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean (B, C), True at each sample's target class (mdistiller `_get_gt_mask`)."""
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, target.reshape(-1, 1), True)


def binary_log_probs(logits: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """log b = [log p_t, log (1 - p_t)] at temperature T, (B, 2), from log-sum-exps.

    1 - p_t is the summed probability of the non-target classes, computed as
    logsumexp_{j != t}(z_j / T) - logsumexp_j(z_j / T), finite even where p_t rounds to 1.
    """
    z = logits / T
    mask = target_mask(z, target)
    log_norm = torch.logsumexp(z, dim=1)
    log_target = z.gather(1, target.reshape(-1, 1)).squeeze(1) - log_norm
    log_rest = torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=1) - log_norm
    return torch.stack([log_target, log_rest], dim=1)


def tckd_per_sample(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """TCKD_i = T^2 * KL(b^T_i || b^S_i), the binary target-vs-rest KL of each sample, (B,)."""
    _check(logits_s, logits_t, target)
    log_b_s = binary_log_probs(full_precision(logits_s), target, T)
    log_b_t = binary_log_probs(full_precision(logits_t).detach(), target, T)
    return F.kl_div(log_b_s, log_b_t, reduction="none", log_target=True).sum(dim=1) * T**2


def nckd_per_sample(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """NCKD_i = T^2 * KL(p^^T_i || p^^S_i) among the non-target classes of each sample, (B,).

    p^^ is the softmax of z / T - NCKD_MASK * onehot(t) (mdistiller DKD.py): the target class is
    pushed to probability 0, which renormalises the softmax over the classes j != t.
    """
    _check(logits_s, logits_t, target)
    z_s, z_t = full_precision(logits_s), full_precision(logits_t).detach()
    shift = NCKD_MASK * target_mask(z_s, target).to(z_s.dtype)
    log_p_s = F.log_softmax(z_s / T - shift, dim=1)
    log_p_t = F.log_softmax(z_t / T - shift.to(z_t.dtype), dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1) * T**2


def tckd(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """TCKD, the batch mean of `tckd_per_sample` (mdistiller: KL summed, / batch size, * T^2)."""
    return tckd_per_sample(logits_s, logits_t, target, T).mean()


def nckd(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, T: float) -> torch.Tensor:
    """NCKD, the batch mean of `nckd_per_sample` (mdistiller: KL summed, / batch size, * T^2)."""
    return nckd_per_sample(logits_s, logits_t, target, T).mean()


def dkd_loss(
    logits_s: torch.Tensor,
    logits_t: torch.Tensor,
    target: torch.Tensor,
    alpha: float = DKD_ALPHA,
    beta: float = DKD_BETA_DEFAULT,
    T: float = DKD_T,
) -> torch.Tensor:
    """DKD = alpha * TCKD + beta * NCKD (batch means, T^2 included), mdistiller `dkd_loss`.

    Without the warm-up factor and without cross-entropy; the method multiplies this by
    `dkd_warmup(epoch)` and adds DKD_CE_WEIGHT * CE.
    """
    return alpha * tckd(logits_s, logits_t, target, T) + beta * nckd(logits_s, logits_t, target, T)


def dkd_warmup(epoch: int, warmup: int = DKD_WARMUP_EPOCHS) -> float:
    """Linear warm-up factor of the DKD term: min(epoch / warmup, 1).

    `epoch` is 1-based, as in mdistiller (`BaseTrainer.train` starts at epoch = 1 and
    `DKD.forward_train` uses min(epoch / WARMUP, 1.0)): the first epoch trains at 1/20 of the
    DKD weight and epoch 20 onwards at the full weight. A loop that counts epochs from 0 passes
    epoch + 1. The factor changes once per epoch, not per iteration. warmup = 0 turns it off.
    """
    if warmup < 0:
        raise ConfigError(
            f"DKD warm-up must be >= 0 epochs, got {warmup}; use {DKD_WARMUP_EPOCHS} (the paper's) or 0 for none"
        )
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (1-based, as mdistiller), got {epoch}")
    if warmup == 0:
        return 1.0
    return min(epoch / warmup, 1.0)
