"""Pure loss functions of the distillation methods (METHOD 8.2-8.6, section 0 item 7).

Every function here is a formula on tensors: no modules, no state. The methods in
`common/methods` wire them to students, projectors and teacher features. Inputs that arrive in a
low-precision autocast dtype are computed in float32; float64 inputs stay float64 (golden tests).

Feature tensors are *channels first*: (B, C, H, W), (B, C, T) or (B, C) (see
`common/methods/projectors.py` for how ViT tokens and flat vectors are brought into that layout).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_FULL_PRECISION = (torch.float32, torch.float64)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it arrives in a low-precision autocast dtype; float32/float64 as they are."""
    return x if x.dtype in _FULL_PRECISION else x.float()


# ----------------------------------------------------------------------------- logit KD (8.4)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit standardisation (Sun et al.; METHOD 8.4): z' = (z - mean(z)) / (std(z) + eps).

    Mean and *unbiased* std over the class dimension, per sample.
    """
    logits = full_precision(logits)
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Vanilla KD (METHOD 8.4): KL( softmax(z_t / T) || softmax(z_s / T) ).

    Summed over classes, averaged over the batch. No T^2 factor: the method's KD weight supplies
    it (16 for T = 4). With `standardize`, both logit vectors go through `standardize_logits`
    first (logit-standardised KD).
    """
    z_s, z_t = full_precision(student_logits), full_precision(teacher_logits)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1).mean()


# ----------------------------------------------------------------------------- feature MSE (8.2)


def adaptive_avg_pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of a channels-first map with 1 or 2 spatial dims to `size`."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    kernel = tuple(n // s for n, s in zip(x.shape[2:], size))
    area = math.prod(kernel)
    if all(n % s == 0 for n, s in zip(x.shape[2:], size)) and area & (area - 1) == 0 and math.prod(size) > 1:
        # Whole windows of 2^j elements: plain pooling with kernel = stride = n / s gives the
        # adaptive result bit for bit (tests/test_loss_kernels.py; other window sizes and a
        # single output element differ in the last bit) and is faster, backward especially.
        return {1: F.avg_pool1d, 2: F.avg_pool2d}[len(size)](x, kernel)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}[len(size)]
    return pool(x, size)


def pooled_side(student_size: Sequence[int], teacher_size: Sequence[int]) -> str:
    """Which map the pooling rule of METHOD 8.2 shrinks: "teacher" or "student".

    Student no larger than the teacher in every spatial dim: the teacher is pooled to the
    student's size (a no-op when equal). Student larger in every dim: the student is pooled to
    the teacher's size. Anything else (larger in one dim, not in another) is unsupported, as in
    the reference (ValueError).
    """
    if len(student_size) != len(teacher_size):
        raise ValueError(f"spatial ranks differ: {tuple(student_size)} vs {tuple(teacher_size)}")
    if all(s <= t for s, t in zip(student_size, teacher_size)):
        return "teacher"
    if all(s > t for s, t in zip(student_size, teacher_size)):
        return "student"
    raise ValueError(
        f"student map {tuple(student_size)} is neither <= nor > the teacher map {tuple(teacher_size)} in every dim"
    )


def pool_larger(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling rule (METHOD 8.2): adaptive-average-pool the larger map to the smaller one's size."""
    student_size, teacher_size = tuple(student.shape[2:]), tuple(teacher.shape[2:])
    if pooled_side(student_size, teacher_size) == "teacher":
        return student, adaptive_avg_pool(teacher, student_size)
    return adaptive_avg_pool(student, teacher_size), teacher


def feature_mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l_b = mean over the elements of sample b of (P(F_s) - F_t)^2, shape (B,) (METHOD 8.2).

    Maps of different spatial size are first aligned by `pool_larger`. (The methods pool the
    student *before* projecting it, as the reference does; for the linear 1x1 projector the
    order does not matter.)
    """
    prediction, target = pool_larger(full_precision(prediction), full_precision(target))
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return (prediction - target).pow(2).flatten(1).mean(dim=1)


def feature_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair feature loss of METHOD 8.2: mean over a sample's elements, then over the batch.

    Every sample has as many elements, so this is the mean over all elements: one fused
    `mse_loss` kernel (forward and backward) instead of four elementwise passes.
    """
    prediction, target = pool_larger(full_precision(prediction), full_precision(target))
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(prediction, target)


def fkd_loss(
    pair_losses: Sequence[torch.Tensor],
    pair_weights: Sequence[float | torch.Tensor],
    n_student_layers: int,
) -> torch.Tensor:
    """L_FKD = (1 / n_student_layers) * mean_batch( sum_pairs w_p * l_p )   (METHOD 8.2, 8.3).

    The reference sums the weighted pair losses of each student layer, l_i = sum_t w_it l_it,
    and averages over the student layers. One2One (w = 1, one pair per layer): the mean of the
    pair losses. FullyConnected (w = 1/n_teacher per pair): the mean over all pairs. A pair loss
    is a scalar or a per-sample (B,) vector; a weight is a float or per-sample (B,) vector.
    """
    if len(pair_losses) != len(pair_weights):
        raise ValueError(f"{len(pair_losses)} pair losses but {len(pair_weights)} weights")
    total = sum(w * loss for loss, w in zip(pair_losses, pair_weights))
    return torch.as_tensor(total).mean() / n_student_layers


# ----------------------------------------------------------------------------- relations (8.6)


def _flat(features: torch.Tensor) -> torch.Tensor:
    return full_precision(features).reshape(features.shape[0], -1)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    # Gram products under bfloat16 autocast keep ~3 digits; relation losses need full precision.
    return torch.autocast(device_type=x.device.type, enabled=False)


def batch_gram(features: torch.Tensor) -> torch.Tensor:
    """Raw batch Gram matrix G = F F^T of the flattened features, (B, B) (METHOD 8.6, SemCKD).

    Inner products between the samples of one batch, the input of SemCKD's attention MLPs; not
    `common.quality.formulas.gram_matrix`, which is X X^T over a whole subset in float64 for S, I, E.
    """
    flat = _flat(features)
    with _no_autocast(flat):
        return flat @ flat.T


def normalized_gram(features: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Cosine matrix G = F^ F^T with F^ = F / (||F||_2 + eps) per sample, NaNs set to 0 (METHOD 8.6)."""
    flat = _flat(features)
    flat = flat / (flat.norm(dim=1, keepdim=True) + eps)
    flat = torch.where(torch.isnan(flat), torch.zeros_like(flat), flat)
    with _no_autocast(flat):
        return flat @ flat.T


def similarity_preserving_ref_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The reference's similarity loss (preset `sp_ref`, the paper's "Sim. Pres." bars): mean over
    all B x B entries of (G_s - G_t)^2, G = `normalized_gram` (cosine matrix).

    The whole matrix (METHOD section 0 item 7, 12.13; the reference compared only row 0, a slip
    kept fixed). Not Tung & Mori's loss: see `similarity_preserving_loss`.
    """
    return (normalized_gram(student, eps) - normalized_gram(teacher, eps)).pow(2).mean()


def row_normalized_gram(features: torch.Tensor) -> torch.Tensor:
    """Tung & Mori (ICCV 2019) eq. 1-3: G = Q Q^T of the flattened batch Q (B, C*H*W), then each
    row G[i, :] divided by its L2 norm (F.normalize, eps 1e-12, so an all-zero row stays 0).

    The Gram product runs in float32 at least, outside autocast: with bfloat16 the entries of a
    row differ in the third digit, which is all the loss sees.
    """
    flat = _flat(features)
    with _no_autocast(flat):
        return F.normalize(flat @ flat.T, p=2, dim=1)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Published similarity-preserving loss (Tung & Mori, ICCV 2019, eq. 4, one layer pair):
    ||G~_t - G~_s||_F^2 / b^2 with G~ = `row_normalized_gram`. Preset `sp` sums it over the pairs
    as eq. 4 does; the two layers may differ in size (only the B x B matrices meet).
    """
    b = student.shape[0]
    return (row_normalized_gram(student) - row_normalized_gram(teacher)).pow(2).sum() / (b * b)


def semckd_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """SemCKD layer attention (METHOD 8.6): w_b[s, t] = softmax_t( <q_b^(s), k_b^(t)> ).

    queries (B, n_s, E) from the student layers, keys (B, n_t, E) from the teacher layers;
    returns per-sample weights (B, n_s, n_t) that sum to 1 over t.
    """
    return torch.softmax(queries @ keys.transpose(1, 2), dim=2)


def semckd_loss(pair_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SemCKD feature loss (METHOD 8.6 with the reduction of 8.2):
    (1 / n_s) * mean_b sum_{s,t} w_b[s,t] * l_b[s,t], from per-sample pair losses (B, n_s, n_t).
    """
    return (weights * pair_losses).sum(dim=(1, 2)).mean() / pair_losses.shape[1]
