"""The numbers of METHOD section 10 as small pure functions, with the reporting decisions of
section 0 item 8 (stage 3's tables in `common.report.tables` apply them; the study reuses some):

* across the runs of one method: mean and POPULATION std (ddof=0, as the reference's np.std);
  the reference's "drop runs more than 1 pt below the best run" rule only when asked;
* ARI (`ari`, `ari_text`), epochs-to-target (`epochs_to_reach`);
* which methods are competitors, and the row order within a pair (`is_competitor`, `method_rank`);
* which CE variant is a method's baseline (`match_baseline`);
* headroom: teacher minus CE student, too small to tell a distillation gain from seed noise
  (`headroom_too_small`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

BASELINE = "ce"  # the CE-only student every method is compared with
OURS = "ours"
TEACHER = "teacher"  # method label of the teacher rows of the accuracy table
ARI_CUTOFF = 0.5  # METHOD 10: only competitors with Delta_m >= 0.5 pt enter the ARI
ARI_MAX = 15.0  # METHOD 10: ARI outside (0, 15) is shown as "unstable"
OUTLIER_TOLERANCE = 1.0  # METHOD 10: runs more than 1 pt below the best run are outliers
# Headroom (issue 10 item 3): teacher minus CE student, best-epoch accuracy. Below the larger of
# 1 point and twice the CE student's seed std, a distilled student cannot show a gain that is
# told apart from seed noise: the report says so.
HEADROOM_MIN_POINTS = 1.0
HEADROOM_STD_FACTOR = 2.0


def drop_outlier_runs(best: Sequence[float], tolerance: float = OUTLIER_TOLERANCE) -> np.ndarray:
    """Mask of runs kept by the reference's rule: best >= max(best) - tolerance (METHOD 10)."""
    best = np.asarray(best, dtype=float)
    return best >= np.nanmax(best) - tolerance if best.size else best.astype(bool)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and POPULATION std (ddof=0), as the reference's np.std (METHOD 10); NaNs ignored."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=0))


def ari(delta_ours: float, delta_competitors: Sequence[float], cutoff: float = ARI_CUTOFF) -> float:
    """ARI = mean over competitors m with Delta_m >= cutoff of Delta_ours / Delta_m (METHOD 10).

    Delta = accuracy - CE-student accuracy, in points. NaN when no competitor qualifies.
    """
    deltas = np.asarray([d for d in delta_competitors if not math.isnan(d) and d >= cutoff], dtype=float)
    if deltas.size == 0 or math.isnan(delta_ours):
        return float("nan")
    return float(np.mean(delta_ours / deltas))


def ari_text(value: float) -> str:
    """As the reference prints it: 'NN%' when 0 < ARI < 15, else 'unstable'; 'n/a' when undefined."""
    if math.isnan(value):
        return "n/a"
    return f"{value * 100:.0f}%" if 0 < value < ARI_MAX else "unstable"


def epochs_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose accuracy >= target, or None when never (METHOD 10 step 3).

    The reference returns the last epoch when the target is never reached; we keep it missing
    so that "not reached" is never mistaken for a number.
    """
    hits = np.flatnonzero(np.asarray(curve, dtype=float) >= target)
    return int(hits[0]) + 1 if hits.size else None


def is_competitor(method: str, ours: str = OURS, baseline: str = BASELINE,
                  competitors: Iterable[str] | None = None) -> bool:
    """Methods that enter the ARI: by default every method except the CE student, ours, the
    teacher, and our ablations (names that start with `ours`, e.g. ours_ce, ours_s). An explicit
    `competitors` list replaces the default rule."""
    if competitors is not None:
        return method in set(competitors)
    return method not in (baseline, TEACHER) and not method.startswith(ours)


def method_rank(method: str, ours: str = OURS) -> int:
    """Row order within a pair: teacher, CE student, competitors, our ablations, ours."""
    if method == TEACHER:
        return 0
    if method == BASELINE:
        return 1
    if method == ours:
        return 4
    return 3 if method.startswith(ours) else 2


def _regime_dict(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) and value else {}


def match_baseline(target_regime: str | None, candidates: pd.DataFrame) -> str | None:
    """Pick the CE variant whose regime matches `target_regime` best.

    Rule: the most equal keys among the regime settings (`common.artifacts.discovery.regime`: dataset and
    train sections without seed, lr, device and other runtime-only keys); ties go to the variant
    with more finished runs, then to the lexicographically first hash. `candidates` has one row
    per CE variant with columns variant, regime, n_runs.
    """
    if candidates.empty:
        return None
    want = _regime_dict(target_regime)

    def score(row: dict[str, Any]) -> tuple[int, int, str]:
        have = _regime_dict(row["regime"])
        equal = sum(1 for k, v in want.items() if k in have and have[k] == v)
        return (-equal, -int(row["n_runs"]), str(row["variant"]))

    return str(min(candidates.to_dict("records"), key=score)["variant"])


def headroom_floor(ce_std: float) -> float:
    """The smallest headroom a gain can be told from seed noise by: max(1 point, 2 x the CE
    student's population std over seeds); a NaN std (one seed) counts as 0."""
    noise = 0.0 if math.isnan(ce_std) else HEADROOM_STD_FACTOR * ce_std
    return max(HEADROOM_MIN_POINTS, noise)


def headroom_too_small(headroom: float, ce_std: float) -> bool:
    """The rule of `HEADROOM_MIN_POINTS`: headroom < `headroom_floor(ce_std)`."""
    return headroom < headroom_floor(ce_std)
