"""Write tests/golden/losses.json: inputs and expected values for every loss in common/methods/losses.py.

Computed independently in numpy float64 straight from the formulas of METHOD 8.2-8.6 (no torch,
no import of the code under test). Rerun only when a formula is meant to change:
    .venv/bin/python tests/golden/make_losses_golden.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("losses.json")


def standardize(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mean = z.mean(axis=1, keepdims=True)
    std = z.std(axis=1, ddof=1, keepdims=True)
    return (z - mean) / (std + eps)


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def kd(zs: np.ndarray, zt: np.ndarray, temperature: float, std: bool) -> float:
    if std:
        zs, zt = standardize(zs), standardize(zt)
    ls, lt = log_softmax(zs / temperature), log_softmax(zt / temperature)
    pt = np.exp(lt)
    return float((pt * (lt - ls)).sum(axis=1).mean())


def row_normalized_gram(f: np.ndarray) -> np.ndarray:
    q = f.reshape(f.shape[0], -1)
    g = q @ q.T
    norms = np.sqrt((g * g).sum(axis=1, keepdims=True))
    return g / np.maximum(norms, 1e-12)


def sp_published(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]
    return float(((row_normalized_gram(fs) - row_normalized_gram(ft)) ** 2).sum() / b**2)


def pool_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Adaptive average pooling along one axis: bin i covers [floor(i*n/out), ceil((i+1)*n/out))."""
    n = x.shape[axis]
    bins = [np.take(x, range(math.floor(i * n / out), math.ceil((i + 1) * n / out)), axis=axis).mean(axis=axis) for i in range(out)]
    return np.stack(bins, axis=axis)


def adaptive_pool(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    for k, out in enumerate(size):
        x = pool_axis(x, 2 + k, out)
    return x


def mse_per_sample(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    ps, ts = pred.shape[2:], target.shape[2:]
    if all(a <= b for a, b in zip(ps, ts)):
        target = adaptive_pool(target, ps)
    else:
        pred = adaptive_pool(pred, ts)
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(axis=1)


def cos_matrix(f: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    f = f.reshape(f.shape[0], -1)
    f = f / (np.sqrt((f**2).sum(axis=1, keepdims=True)) + eps)
    return f @ f.T


def main() -> None:
    rng = np.random.default_rng(20251114)
    cases: dict[str, dict] = {}

    z = rng.normal(0, 3, (4, 5))
    cases["standardize_logits"] = {"inputs": {"logits": z}, "expected": standardize(z)}

    zs, zt = rng.normal(0, 2, (6, 5)), rng.normal(0, 4, (6, 5))
    for name, temperature, std in [("kd_T4", 4.0, False), ("kd_T2", 2.0, False), ("kd_T4_std", 4.0, True), ("kd_T1_std", 1.0, True)]:
        cases[name] = {
            "inputs": {"student_logits": zs, "teacher_logits": zt, "temperature": temperature, "standardize": std},
            "expected": kd(zs, zt, temperature, std),
        }

    shapes = {
        "mse_teacher_larger": ((3, 2, 2, 2), (3, 2, 4, 4)),
        "mse_student_larger": ((3, 2, 6, 6), (3, 2, 3, 3)),
        "mse_equal": ((2, 3, 2, 2), (2, 3, 2, 2)),
        "mse_teacher_larger_uneven": ((2, 3, 3, 3), (2, 3, 5, 5)),
        "mse_tokens": ((2, 4, 3), (2, 4, 7)),
        "mse_vector": ((4, 6), (4, 6)),
    }
    for name, (ps, ts) in shapes.items():
        pred, target = rng.normal(size=ps), rng.normal(size=ts)
        per_sample = mse_per_sample(pred, target)
        cases[name] = {"inputs": {"prediction": pred, "target": target}, "expected": {"per_sample": per_sample, "mean": float(per_sample.mean())}}

    losses = rng.uniform(0, 2, 4)
    cases["fkd_one2one"] = {
        "inputs": {"pair_losses": losses, "pair_weights": np.ones(4), "n_student_layers": 4},
        "expected": float(losses.sum() / 4),
    }
    # full mapping, 2 student x 3 teacher layers, per-sample pair losses, weight 1/3 each
    per_sample = rng.uniform(0, 2, (6, 5))
    per_layer = [sum(per_sample[s * 3 + t] / 3 for t in range(3)) for s in range(2)]
    cases["fkd_full"] = {
        "inputs": {"pair_losses": per_sample, "pair_weights": np.full(6, 1 / 3), "n_student_layers": 2},
        "expected": float(np.mean([v.mean() for v in per_layer])),
    }

    fs, ft = rng.normal(size=(5, 3, 2, 2)), rng.normal(size=(5, 6))
    fs[2] = 0.0  # a zero feature: eps keeps the normalisation finite
    cases["similarity_preserving"] = {
        "inputs": {"student": fs, "teacher": ft},
        "expected": {"gram_student": cos_matrix(fs), "loss": float(((cos_matrix(fs) - cos_matrix(ft)) ** 2).mean())},
    }

    f = rng.normal(size=(4, 2, 3))
    flat = f.reshape(4, -1)
    cases["batch_gram"] = {"inputs": {"features": f}, "expected": flat @ flat.T}

    q, k = rng.normal(size=(3, 2, 4)), rng.normal(size=(3, 3, 4))
    logits = np.einsum("bse,bte->bst", q, k)
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    cases["semckd_attention"] = {"inputs": {"queries": q, "keys": k}, "expected": weights}

    pair = rng.uniform(0, 2, (3, 2, 3))
    total = 0.0
    for s in range(2):
        total += np.mean([sum(weights[b, s, t] * pair[b, s, t] for t in range(3)) for b in range(3)])
    cases["semckd_loss"] = {"inputs": {"pair_losses": pair, "weights": weights}, "expected": float(total / 2)}

    # Published SP (Tung & Mori 2019, eq. 1-4), its own generator so the cases above keep their
    # values: G = Q Q^T, rows divided by their L2 norm (a zero row stays zero), ||G~s - G~t||^2 / b^2.
    sp_rng = np.random.default_rng(2019)
    fs = np.maximum(sp_rng.normal(size=(6, 4, 3, 3)), 0.0)  # post-ReLU maps, as the loss meets them
    ft = np.maximum(sp_rng.normal(size=(6, 10)), 0.0)
    fs[4] = 0.0  # an all-zero sample: its Gram row is 0 and stays 0 after the normalisation
    cases["similarity_preserving_published"] = {
        "inputs": {"student": fs, "teacher": ft},
        "expected": {"gram_student": row_normalized_gram(fs), "loss": sp_published(fs, ft)},
    }

    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    OUT.write_text(json.dumps(plain(cases), indent=1) + "\n")


if __name__ == "__main__":
    main()
