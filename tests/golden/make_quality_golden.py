"""Regenerate tests/golden/quality.json: S, I, E, Q of small synthetic layers.

The expected values come from an INDEPENDENT float64 numpy re-derivation written directly from
the pseudocode of ../shared/METHOD.md 6.4-6.6 (brute-force |cos| and distance matrices, numpy
SVD), never from `common.quality.formulas`. Inputs are regenerated from the case specs with numpy's
legacy `RandomState` (a frozen stream), so the JSON stores only specs, a checksum and results.

    .venv/bin/python tests/golden/make_quality_golden.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("quality.json")

# name -> spec. a/b: samples per class in subsets A/B (a list: per class); shape: feature shape per
# sample; std: per-dimension noise scale profile; relu: make features non-negative (conv-like);
# shared: subset B is subset A; offset: common offset added to every feature (cancellation case);
# twin: near-duplicates (~1e-4 apart) across classes, for every class.
CASES: dict[str, dict] = {
    # D < n_per_class (B), truncation T = D: no padding inside the truncated spectrum
    "d_lt_n": dict(seed=1, classes=3, a=6, b=12, shape=[6], std=[10, 3, 1, 0.3, 0.1, 0.03], n_train=60000),
    # D < n_k for two of three classes and T between them: the exact-zero H_k = 0 quirk hits
    # classes 0 and 1 only (their spectrum length 8 < T)
    "quirk_zero": dict(
        seed=2, classes=3, a=5, b=[8, 8, 12], shape=[10], std=[4, 3.5, 3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], n_train=60000
    ),
    # D > n_per_class, near-isotropic: T = n_max
    "d_gt_n": dict(seed=3, classes=4, a=8, b=10, shape=[40], std="flat", n_train=50000),
    # D > n_per_class but a few strong directions: T (sum of k95) < n_max
    "truncated": dict(seed=4, classes=2, a=10, b=20, shape=[30], std="steep", n_train=1000),
    # conv-like 4-D features, non-negative
    "conv4d": dict(seed=5, classes=3, a=7, b=9, shape=[3, 4, 4], std="flat", relu=True, n_train=60000),
    # token-like 3-D features, subset B = subset A
    "tokens3d": dict(seed=6, classes=3, a=8, b=8, shape=[5, 7], std="flat", shared=True, n_train=60000),
    # Layers narrower than subset B's classes (D < n_max = max_k |B_k|, METHOD 6.5): Lambda has
    # n_max columns, zero past min(n_k, D), so a truncation T > D reaches the padding.
    # D < n_max and T > D: every class's truncated row holds padding zeros, H_k = 0, I = 0, Q = S
    "narrow_t_gt_d": dict(seed=8, classes=4, a=6, b=30, shape=[8], std="flat", relu=True, n_train=50000),
    # T <= D < n_max: a few strong directions keep T inside the spectrum, I > 0
    "narrow_t_le_d": dict(seed=9, classes=2, a=8, b=40, shape=[16], std="steep", n_train=50000),
    # D = n_max - 1: one padding column per class; T = n_max reaches it
    "d_nmax_minus_1": dict(seed=10, classes=3, a=6, b=12, shape=[11], std="flat", n_train=50000),
    # D = n_max: no padding (the last, centred-away eigenvalue is a rounding-size non-zero)
    "d_eq_nmax": dict(seed=11, classes=3, a=6, b=12, shape=[12], std="flat", n_train=50000),
    # unequal class sizes in B, D between them and 10 < T < D: only class 0 (n_0 = 10) reaches its
    # padding (H_0 = 0); classes 1 and 2 (spectrum length D = 18) keep their entropy; n_max = 30
    "unequal_b": dict(
        seed=12, classes=3, a=5, b=[10, 20, 30], shape=[18], std=[6, 5, 4, 3.5, 3, 2.5] + [0.2] * 12, n_train=50000
    ),
    # large common offset and a near-duplicate pair across classes: the distance trick cancels
    "offset_twin": dict(
        seed=7, classes=3, a=6, b=6, shape=[20], std="flat", offset=1000.0, twin=True, n_train=60000
    ),
}


def _std_profile(spec: dict, dim: int) -> np.ndarray:
    std = spec["std"]
    if std == "flat":
        return np.linspace(1.0, 0.5, dim)
    if std == "steep":
        return 8.0 * 0.25 ** np.arange(dim)
    return np.asarray(std, dtype=np.float64)


def _sample(rng: np.random.RandomState, spec: dict, per_class: list[int]) -> tuple[np.ndarray, np.ndarray]:
    dim = int(np.prod(spec["shape"]))
    std = _std_profile(spec, dim)
    means = rng.normal(0.0, 2.0, size=(spec["classes"], dim))
    rows, labels = [], []
    for c, count in enumerate(per_class):
        rows.append(means[c] + rng.normal(size=(count, dim)) * std)
        labels.append(np.full(count, c))
    x = np.concatenate(rows) + spec.get("offset", 0.0)
    if spec.get("relu"):
        x = np.maximum(x, 0.0)
    return x.reshape(-1, *spec["shape"]), np.concatenate(labels)


def case_inputs(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(xa, ya, xb, yb, n_train) of a golden case; features float64 of shape [n, *shape]."""
    spec = CASES[name]
    rng = np.random.RandomState(spec["seed"])
    per_a = [spec["a"]] * spec["classes"]
    per_b = spec["b"] if isinstance(spec["b"], list) else [spec["b"]] * spec["classes"]
    xa, ya = _sample(rng, spec, per_a)
    if spec.get("twin"):
        # every class c >= 1 gets a near copy of a class-0 sample, so every class's minimum
        # inter-class distance is tiny next to the norms
        flat = xa.reshape(len(xa), -1)
        class0 = np.flatnonzero(ya == 0)
        for c in range(1, spec["classes"]):
            first = int(np.flatnonzero(ya == c)[0])
            flat[first] = flat[class0[c - 1]] + rng.normal(scale=1e-4, size=flat.shape[1])
        xa = flat.reshape(xa.shape)
    if spec.get("shared"):
        xb, yb = xa.copy(), ya.copy()
    else:
        xb, yb = _sample(rng, spec, per_b)
    # shuffle so that no code path can rely on class-sorted rows
    pa, pb = rng.permutation(len(ya)), rng.permutation(len(yb))
    return xa[pa], ya[pa], xb[pb], yb[pb], spec["n_train"]


def derive(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, n_train: int) -> dict:
    """METHOD 6.6 pseudocode, steps 3-4, in float64 (the golden values)."""
    X = xa.reshape(len(xa), -1).astype(np.float64)
    n, D = X.shape
    r = np.sqrt((X**2).sum(1))
    Xh = X / r[:, None]
    Cm = np.abs(Xh @ Xh.T)
    Dm = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    A = [np.flatnonzero(ya == c) for c in np.unique(ya)]
    C = len(A)
    avg_intra = np.mean([Cm[np.ix_(a, a)].mean() for a in A])
    avg_min_intra = np.mean([Cm[np.ix_(a, a)].min() for a in A])
    avg_inter = np.mean([Cm[np.ix_(a, b)].mean() for i, a in enumerate(A) for j, b in enumerate(A) if i != j])
    avg_norm = np.mean([r[a].mean() for a in A])
    avg_min_inter = np.mean(
        [min(Dm[np.ix_(a, b)].min() for j, b in enumerate(A) if j != i) for i, a in enumerate(A)]
    )
    S = avg_intra - avg_inter
    pcagid = min(n, D)
    K = (n_train / math.pi) ** (1.0 / pcagid)
    E = 2.0 * avg_min_inter / avg_norm * K

    XB = xb.reshape(len(xb), -1).astype(np.float64)
    B = [np.flatnonzero(yb == c) for c in np.unique(yb)]
    n_max = max(len(b) for b in B)
    Lam = np.zeros((len(B), n_max))
    for k, b in enumerate(B):
        Z = XB[b] - XB[b].mean(0)
        s2 = np.linalg.svd(Z, compute_uv=False) ** 2
        Lam[k, : len(s2)] = s2 / s2.sum()
    k95 = []
    for k in range(len(B)):
        for t in range(n_max):
            if Lam[k, :t].sum() >= 0.95:
                break
        else:
            t = n_max - 1
        k95.append(t)
    T = min(sum(k95), n_max)
    P = Lam[:, :T] / Lam[:, :T].sum(1, keepdims=True)
    H = np.array([0.0 if np.any(P[k] == 0) else -(P[k] * np.log(P[k])).sum() for k in range(len(B))])
    zero_classes = [k for k in range(len(B)) if np.any(P[k] == 0)]
    # exact zeros must be the zero padding only, not an accident of the SVD's rounding
    padded = [k for k, b in enumerate(B) if min(len(b), D) < T]
    assert zero_classes == padded, (zero_classes, padded)
    svde = H.mean()
    I = (1.0 - avg_min_intra) * svde / np.log(5)
    Q = S + np.sqrt(I * E)
    return {
        "S": S, "I": I, "E": E, "Q": Q, "sqrtIE": np.sqrt(I * E),
        "AvgIntra": avg_intra, "AvgInter": avg_inter, "AvgMinIntra": avg_min_intra,
        "AvgNorm": avg_norm, "AvgMinInterDist": avg_min_inter, "SVDE": svde,
        "T": T, "PCAGID": pcagid, "K": K, "D": D,
        "k95": k95, "zero_classes": zero_classes, "classes": C,
    }


def _plain(value):
    if isinstance(value, list):
        return value
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def checksum(*arrays: np.ndarray) -> float:
    return float(sum(np.abs(a).sum() for a in arrays))


def main() -> None:
    golden = {}
    for name in CASES:
        xa, ya, xb, yb, n_train = case_inputs(name)
        values = derive(xa, ya, xb, yb, n_train)
        golden[name] = {
            "checksum": checksum(xa, xb),
            "expected": {key: _plain(value) for key, value in values.items()},
        }
    OUT.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
