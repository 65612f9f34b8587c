"""Statistics of the layer-selection study (issue 10), as pure functions of plain numbers.

* `spearman`: rank correlation with average ranks for ties (Pearson's r of the ranks, what
  scipy.stats.spearmanr computes); NaN with fewer than 3 points or a constant side.
* `bootstrap_spearman`: a percentile interval for it over seeds: resample each layer's seeds
  with replacement, recompute each layer's mean accuracy, recompute the correlation.
* `paired_difference`: mean and Student-t interval of per-seed differences (same seeds on both
  sides, so the seed-to-seed variation shared by both arms cancels).
* `difference_sentence`: that interval in words.

Accuracies are in percent, differences in percentage points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
N_BOOTSTRAP = 2000


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks) along the last axis."""
    return stats.rankdata(values, axis=-1, method="average")


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of x (n,) against every row of y (..., n); NaN where a side is constant."""
    xc = x - x.mean()
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum()) * np.sqrt((yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * xc).sum(axis=-1) / denom
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two equally long sequences (NaN pairs dropped)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 3:
        return float("nan")
    return float(_pearson_rows(_rank_rows(x), _rank_rows(y)))


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # points (layers) or pairs (seeds) behind the estimate

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def bootstrap_spearman(
    criterion: Sequence[float],
    accuracies: Sequence[Sequence[float]],
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Spearman's rho of `criterion` (one value per layer) with the layers' mean accuracy, and a
    percentile bootstrap interval over seeds.

    accuracies[i]: the single-layer accuracies of layer i, one per seed (layers without any are
    dropped, as are layers whose criterion is NaN). Each replicate draws, for every layer,
    len(accuracies[i]) of its seeds with replacement; replicates whose means are all tied (rho
    undefined) are left out of the percentiles. Seeded by `seed` (numpy default_rng).
    """
    crit = np.asarray(criterion, dtype=float)
    if len(crit) != len(accuracies):
        raise ValueError(f"{len(crit)} criterion values but {len(accuracies)} accuracy lists")
    keep = [i for i, a in enumerate(accuracies) if len(a) > 0 and not math.isnan(crit[i])]
    crit = crit[keep]
    accs = [np.asarray(accuracies[i], dtype=float) for i in keep]
    estimate = spearman(crit, [a.mean() for a in accs])
    nan = float("nan")
    if math.isnan(estimate):
        return Interval(estimate, nan, nan, len(keep))
    rng = np.random.default_rng(seed)
    means = np.column_stack([a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1) for a in accs])
    rhos = _pearson_rows(_rank_rows(crit), _rank_rows(means))
    rhos = rhos[~np.isnan(rhos)]
    if rhos.size == 0:
        return Interval(estimate, nan, nan, len(keep))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(rhos, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), len(keep))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *, level: float = LEVEL) -> Interval:
    """Mean of a[s] - b[s] over the seeds s both have (NaN values dropped), with the Student-t
    interval mean +- t_{(1+level)/2, n-1} * sd / sqrt(n), sd with ddof=1. With n < 2 the
    interval is undefined (NaN); with n = 0 the mean is too."""
    seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(a[s]) or math.isnan(b[s])))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    nan = float("nan")
    if d.size == 0:
        return Interval(nan, nan, nan, 0)
    mean = float(d.mean())
    if d.size < 2:
        return Interval(mean, nan, nan, 1)
    half = float(stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return Interval(mean, mean - half, mean + half, int(d.size))


def difference_sentence(ours: str, other: str, diff: Interval, level: float = LEVEL) -> str:
    """`diff` (ours minus other, points, see `paired_difference`) in words."""
    if diff.n == 0:
        return f"{ours} vs {other}: no seed with a finished run on both sides, nothing to compare."
    if not diff.defined:
        lead, trail = (ours, other) if diff.estimate >= 0 else (other, ours)
        return (f"{lead} beat {trail} by {abs(diff.estimate):.2f} points on the single shared seed; the interval is "
                "undefined with n = 1 (run more seeds).")
    half = (diff.high - diff.low) / 2
    ci = lambda low, high: f"({level * 100:g} % CI {low:+.2f} to {high:+.2f}, n = {diff.n} paired seeds)"  # noqa: E731
    if diff.low > 0:
        return f"{ours} beat {other} by {diff.estimate:.2f} ± {half:.2f} points {ci(diff.low, diff.high)}."
    if diff.high < 0:
        return f"{other} beat {ours} by {-diff.estimate:.2f} ± {half:.2f} points {ci(-diff.high, -diff.low)}."
    return (f"no difference detected between {ours} and {other}: {diff.estimate:+.2f} ± {half:.2f} points "
            f"{ci(diff.low, diff.high)}; the interval contains 0.")
