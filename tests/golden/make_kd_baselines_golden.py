"""Write tests/golden/kd_baselines.json: inputs and expected values for DKD and CRD.

An independent re-derivation in plain numpy float64, straight from the papers' definitions and
the reference code's arithmetic (mdistiller DKD.py; RepDistiller crd/), never importing the
project's code. Where the project code takes a shortcut, this script takes the long way:
- NCKD here renormalises the softmax over the non-target classes by deleting the target class
  (the paper's p^), where the code masks it with -1000 (the reference's trick);
- TCKD here sums probabilities, where the code uses log-sum-exps;
- CRD scores here are loops over (b, k) of dot products with gathered memory rows, where the
  code gathers from one (B, N) product.

Rerun only when a formula is meant to change:
    .venv/bin/python tests/golden/make_kd_baselines_golden.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("kd_baselines.json")


# ----------------------------------------------------------------------------- DKD


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def dkd_terms(zs: np.ndarray, zt: np.ndarray, target: np.ndarray, T: float) -> dict[str, list[float]]:
    """Per-sample TCKD, NCKD (both x T^2), classical KD (x T^2) and the teacher's p_t."""
    tckd, nckd, kd, pt_teacher = [], [], [], []
    for s, t, c in zip(zs, zt, target):
        ps, pt = softmax(s / T), softmax(t / T)
        rest = [j for j in range(len(s)) if j != c]
        # binary b = [p_t, sum of the other classes]
        bs = np.array([ps[c], ps[rest].sum()])
        bt = np.array([pt[c], pt[rest].sum()])
        tckd.append(float((bt * np.log(bt / bs)).sum()) * T**2)
        # p^ over the non-target classes only: the softmax of the remaining logits
        hs, ht = softmax(s[rest] / T), softmax(t[rest] / T)
        nckd.append(float((ht * np.log(ht / hs)).sum()) * T**2)
        kd.append(float((pt * np.log(pt / ps)).sum()) * T**2)
        pt_teacher.append(float(pt[c]))
    return {"tckd_per_sample": tckd, "nckd_per_sample": nckd, "kd_per_sample": kd, "p_target_teacher": pt_teacher}


def dkd_case(rng: np.random.Generator, batch: int, classes: int, scale_s: float, scale_t: float, settings) -> dict:
    zs = rng.normal(0, scale_s, (batch, classes))
    zt = rng.normal(0, scale_t, (batch, classes))
    # half the targets agree with the teacher's top class (the usual case), half are random
    target = np.where(np.arange(batch) % 2 == 0, zt.argmax(axis=1), rng.integers(0, classes, batch))
    per_t = {T: dkd_terms(zs, zt, target, T) for T in sorted({T for _, _, T in settings})}
    dkd = []
    for alpha, beta, T in settings:
        tckd = float(np.mean(per_t[T]["tckd_per_sample"]))
        nckd = float(np.mean(per_t[T]["nckd_per_sample"]))
        dkd.append({"alpha": alpha, "beta": beta, "T": T, "tckd": tckd, "nckd": nckd, "dkd": alpha * tckd + beta * nckd})
    return {
        "inputs": {"logits_s": zs.tolist(), "logits_t": zt.tolist(), "target": target.tolist()},
        "per_T": {f"{T:g}": terms for T, terms in per_t.items()},
        "dkd": dkd,
    }


# ----------------------------------------------------------------------------- CRD


def normalise_rows(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt((a**2).sum(axis=1, keepdims=True))


def nce(x: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    """RepDistiller ContrastLoss: -(sum log D1 + sum log D0) / B with P_n = 1 / n_data."""
    batch, width = x.shape
    m = width - 1
    pn = 1.0 / n_data
    total = 0.0
    for b in range(batch):
        total += math.log(x[b, 0] / (x[b, 0] + m * pn + eps))
        for k in range(1, width):
            total += math.log(m * pn / (x[b, k] + m * pn + eps))
    return -total / batch


def crd_steps(rng: np.random.Generator) -> dict:
    n_data, feat_dim, s_dim, t_dim, k_neg, T, momentum = 10, 4, 3, 5, 3, 0.07, 0.3  # 0.3: a swap of m and 1 - m shows
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    mem_s = rng.uniform(-stdv, stdv, (n_data, feat_dim))  # RepDistiller memory_v1
    mem_t = rng.uniform(-stdv, stdv, (n_data, feat_dim))  # memory_v2
    w_s, b_s = rng.normal(0, 0.5, (feat_dim, s_dim)), rng.normal(0, 0.1, feat_dim)
    w_t, b_t = rng.normal(0, 0.5, (feat_dim, t_dim)), rng.normal(0, 0.1, feat_dim)
    labels = rng.integers(0, 3, n_data)
    # step 2 revisits index 4 (updated in step 1) and contrasts against rows step 1 updated
    idx_steps = [np.array([4, 7, 1]), np.array([2, 4, 9])]
    inputs = {
        "n_data": n_data, "feat_dim": feat_dim, "s_dim": s_dim, "t_dim": t_dim, "n_negatives": k_neg,
        "T": T, "momentum": momentum, "memory_student": mem_s.tolist(), "memory_teacher": mem_t.tolist(),
        "embed_s_weight": w_s.tolist(), "embed_s_bias": b_s.tolist(),
        "embed_t_weight": w_t.tolist(), "embed_t_bias": b_t.tolist(), "labels": labels.tolist(), "steps": [],
    }
    expected = []
    z_s = z_t = None
    for idx in idx_steps:
        batch = len(idx)
        f_s, f_t = rng.normal(0, 1, (batch, s_dim)), rng.normal(0, 1, (batch, t_dim))
        negatives = np.stack([rng.choice(np.flatnonzero(labels != labels[i]), k_neg, replace=False) for i in idx])
        contrast_idx = np.concatenate([idx[:, None], negatives], axis=1)
        e_s = normalise_rows(f_s @ w_s.T + b_s)
        e_t = normalise_rows(f_t @ w_t.T + b_t)
        raw_s = np.array([[math.exp(mem_t[j] @ e_s[b] / T) for j in contrast_idx[b]] for b in range(batch)])
        raw_t = np.array([[math.exp(mem_s[j] @ e_t[b] / T) for j in contrast_idx[b]] for b in range(batch)])
        if z_s is None:  # Z is estimated on the first batch only
            z_s, z_t = raw_s.mean() * n_data, raw_t.mean() * n_data
        out_s, out_t = raw_s / z_s, raw_t / z_t
        loss_s, loss_t = nce(out_s, n_data), nce(out_t, n_data)
        for b, i in enumerate(idx):
            mem_s[i] = momentum * mem_s[i] + (1 - momentum) * e_s[b]
            mem_s[i] /= np.sqrt((mem_s[i] ** 2).sum())
            mem_t[i] = momentum * mem_t[i] + (1 - momentum) * e_t[b]
            mem_t[i] /= np.sqrt((mem_t[i] ** 2).sum())
        inputs["steps"].append(
            {"f_s": f_s.tolist(), "f_t": f_t.tolist(), "idx": idx.tolist(), "contrast_idx": contrast_idx.tolist()}
        )
        expected.append({
            "e_s": e_s.tolist(), "e_t": e_t.tolist(), "out_s": out_s.tolist(), "out_t": out_t.tolist(),
            "z": [z_s, z_t], "loss_s": loss_s, "loss_t": loss_t, "loss": loss_s + loss_t,
            "memory_student": mem_s.tolist(), "memory_teacher": mem_t.tolist(),
        })
    return {"inputs": inputs, "expected": expected}


def main() -> None:
    rng = np.random.default_rng(20260220)
    cases: dict[str, dict] = {}
    settings = [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 6.0, 2.0), (1.0, 8.0, 1.0)]
    cases["dkd_random"] = dkd_case(rng, 8, 10, 2.0, 4.0, settings)
    # a confident teacher: p_t^T close to 1 at T = 1, where 1 - p_t loses digits if taken as 1 - p_t
    cases["dkd_confident"] = dkd_case(rng, 4, 6, 1.0, 30.0, [(1.0, 8.0, 1.0), (1.0, 8.0, 4.0)])

    cases["dkd_warmup"] = {
        "inputs": [[e, w] for w in (20, 5) for e in (0, 1, 2, 5, 10, 19, 20, 21, 240)],
        "expected": [min(e / w, 1.0) for w in (20, 5) for e in (0, 1, 2, 5, 10, 19, 20, 21, 240)],
    }

    x = rng.uniform(0.05, 3.0, (5, 7)) / 100  # scores of the size exp(s/T)/Z takes, n_data = 100
    cases["nce_loss"] = {"inputs": {"x": x.tolist(), "n_data": 100}, "expected": nce(x, 100)}
    x_big = rng.uniform(0.5, 2.0, (3, 4))  # a positive far above the noise level
    cases["nce_loss_confident"] = {"inputs": {"x": x_big.tolist(), "n_data": 50}, "expected": nce(x_big, 50)}

    cases["crd_two_steps"] = crd_steps(rng)
    OUT.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
