"""Knowledge-quality metric (METHOD 6, section 0 items 1, 2, 4): golden values, quirks, subsets, selection."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common.quality import formulas as quality
from common.errors import ConfigError, DataError
from common.config import CRITERIA
from common.quality.formulas import MAX_DIMENSION, class_entropies, draw_subsets, flatten_features, layer_quality, layer_stats, select_layers

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "quality.json").read_text())
STAT_KEYS = (
    "S", "I", "E", "Q", "sqrtIE", "AvgIntra", "AvgInter", "AvgMinIntra", "AvgNorm",
    "AvgMinInterDist", "SVDE", "T", "PCAGID", "K", "D",
)  # fmt: skip


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_quality_golden", GOLDEN_DIR / "make_quality_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _golden_module()


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    xa, ya, xb, yb, n_train = GEN.case_inputs(name)
    return torch.from_numpy(xa), torch.from_numpy(ya), torch.from_numpy(xb), torch.from_numpy(yb), n_train


def _entropy(p: list[float]) -> float:
    total = sum(p)
    return -sum(v / total * math.log(v / total) for v in p)


# ---------------------------------------------------------------------------------------------
# golden values (independent float64 numpy re-derivation, tests/golden/make_quality_golden.py)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_layer_stats_matches_golden_rederivation(name):
    xa, ya, xb, yb, n_train = _case(name)
    assert GEN.checksum(xa.numpy(), xb.numpy()) == pytest.approx(GOLDEN[name]["checksum"], rel=1e-12)
    stats = layer_stats(xa, ya, xb, yb, n_train)
    expected = GOLDEN[name]["expected"]
    for key in STAT_KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-5, abs=0.0), key


@pytest.mark.parametrize("name", ["offset_twin", "quirk_zero", "conv4d"])
def test_chunking_does_not_change_results(name, monkeypatch):
    # tiny chunks exercise every chunked path: feature chunks and row blocks of the Gram, row
    # chunks inside a class, candidate batches and the class-spectrum Gram
    monkeypatch.setattr(quality, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(quality, "_ROW_BLOCK", 4)
    stats = layer_stats(*_case(name))
    expected = GOLDEN[name]["expected"]
    for key in STAT_KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-5, abs=0.0), key


def test_cross_class_duplicates_give_zero_distance_even_past_the_candidate_cap(monkeypatch):
    monkeypatch.setattr(quality, "_MAX_CANDIDATES", 3)
    g = torch.Generator().manual_seed(2)
    base = 100.0 + torch.randn(6, 12, generator=g, dtype=torch.float64)
    xa = torch.cat([base, base, 100.0 + torch.randn(6, 12, generator=g, dtype=torch.float64)])
    ya = torch.arange(3).repeat_interleave(6)
    stats = layer_stats(xa, ya, xa, ya, 1000)
    dist = torch.cdist(xa, xa)
    brute = [dist[ya == c][:, ya != c].min().item() for c in range(3)]
    assert brute[0] == brute[1] == 0.0
    assert stats["AvgMinInterDist"] == pytest.approx(sum(brute) / 3, rel=1e-9)


def test_golden_cases_cover_both_regimes_truncation_and_quirk():
    cases = {name: entry["expected"] for name, entry in GOLDEN.items()}
    b_per_class = {name: max(np.bincount(GEN.case_inputs(name)[3])) for name in cases}
    assert cases["d_lt_n"]["D"] < b_per_class["d_lt_n"]
    assert cases["d_gt_n"]["D"] > b_per_class["d_gt_n"]
    assert cases["truncated"]["T"] < b_per_class["truncated"]
    assert cases["quirk_zero"]["zero_classes"] == [0, 1]
    # layers narrower than B's largest class (METHOD 6.5 pads Lambda to n_max = max_k |B_k|)
    n_max = b_per_class
    assert cases["narrow_t_gt_d"]["D"] < cases["narrow_t_gt_d"]["T"] <= n_max["narrow_t_gt_d"]
    assert cases["narrow_t_gt_d"]["I"] == 0.0 and cases["narrow_t_gt_d"]["Q"] == cases["narrow_t_gt_d"]["S"]
    assert cases["narrow_t_le_d"]["T"] <= cases["narrow_t_le_d"]["D"] < n_max["narrow_t_le_d"]
    assert cases["narrow_t_le_d"]["I"] > 0.0
    assert cases["d_nmax_minus_1"]["D"] == n_max["d_nmax_minus_1"] - 1 and cases["d_nmax_minus_1"]["I"] == 0.0
    assert cases["d_eq_nmax"]["D"] == n_max["d_eq_nmax"] and cases["d_eq_nmax"]["zero_classes"] == []
    assert sorted(set(np.bincount(GEN.case_inputs("unequal_b")[3]))) == [10, 20, 30]
    assert cases["unequal_b"]["zero_classes"] == [0]
    assert GEN.case_inputs("conv4d")[0].ndim == 4 and GEN.case_inputs("tokens3d")[0].ndim == 3


def test_all_criteria_are_returned():
    stats = layer_stats(*_case("d_gt_n"))
    assert set(CRITERIA) <= set(stats)
    assert stats["Q"] == pytest.approx(stats["S"] + math.sqrt(stats["I"] * stats["E"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# invariances the formulas imply


@pytest.mark.parametrize("scale", [1000.0, -0.01])
def test_s_i_e_q_are_invariant_to_scaling_the_features(scale):
    # |cos| ignores the scale; class spectra are ratios; E = 2 K MinInterDist / Norm is a ratio
    xa, ya, xb, yb, n_train = _case("d_gt_n")
    base = layer_stats(xa, ya, xb, yb, n_train)
    scaled = layer_stats(xa * scale, ya, xb * scale, yb, n_train)
    for key in ("S", "I", "E", "Q", "AvgIntra", "AvgMinIntra", "SVDE"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-9), key
    assert scaled["AvgNorm"] == pytest.approx(abs(scale) * base["AvgNorm"], rel=1e-9)


def test_stats_ignore_sample_order_and_label_values():
    xa, ya, xb, yb, n_train = _case("conv4d")
    base = layer_stats(xa, ya, xb, yb, n_train)
    g = torch.Generator().manual_seed(3)
    pa, pb = torch.randperm(len(ya), generator=g), torch.randperm(len(yb), generator=g)
    relabel = lambda y: 10 * (2 - y) + 7  # noqa: E731 - other, non-contiguous class ids
    moved = layer_stats(xa[pa], relabel(ya[pa]), xb[pb], relabel(yb[pb]), n_train)
    for key in STAT_KEYS:
        assert moved[key] == pytest.approx(base[key], rel=1e-9), key


# ---------------------------------------------------------------------------------------------
# reference quirks (METHOD 0.1, 12.4-12.7)


def test_exact_zero_in_truncated_spectrum_zeroes_that_class_entropy():
    # class 0 has a 3-long spectrum (min(n_k, D) = 3) padded with a zero; class 1 has 4 entries
    lam = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.5, 0.3, 0.12, 0.08]], dtype=torch.float64)
    entropy, truncation = class_entropies(lam, torch.tensor([3, 4]))
    # k95 = 3 and 3 -> SUM 6 (not the mean 3), capped at n_max = 4
    assert truncation == 4
    assert entropy[0].item() == 0.0
    assert entropy[1].item() == pytest.approx(_entropy([0.5, 0.3, 0.12, 0.08]), rel=1e-12)


def test_truncation_is_the_sum_of_class_95_percent_dimensions():
    lam = torch.tensor(
        [[0.7, 0.27, 0.01, 0.01, 0.005, 0.005], [0.9, 0.08, 0.01, 0.005, 0.003, 0.002]], dtype=torch.float64
    )
    entropy, truncation = class_entropies(lam, torch.tensor([6, 6]))
    assert truncation == 4  # k95 = 2 for both classes
    expected = [_entropy([0.7, 0.27, 0.01, 0.01]), _entropy([0.9, 0.08, 0.01, 0.005])]
    assert entropy.tolist() == pytest.approx(expected, rel=1e-12)


def test_zero_variance_class_behaves_like_the_reference():
    # NaN ratios: the reference's while loop stops at k95 = 1; the NaN entropy becomes 0
    lam = torch.tensor([[math.nan] * 3, [0.7, 0.2, 0.1]], dtype=torch.float64)
    entropy, truncation = class_entropies(lam, torch.tensor([3, 3]))
    assert truncation == 3  # 1 + 2 (class 1 never reaches 95 % before the cap n_max - 1 = 2)
    assert entropy.tolist() == pytest.approx([0.0, _entropy([0.7, 0.2, 0.1])])


def test_zero_variance_class_end_to_end_contributes_zero_entropy():
    xa, ya, xb, yb, n_train = _case("d_gt_n")
    xb = xb.clone()
    xb[yb == 2] = xb[yb == 2][0]  # identical samples: zero total variance
    stats = layer_stats(xa, ya, xb, yb, n_train)
    assert math.isfinite(stats["I"]) and stats["I"] > 0.0


def test_k_uses_pcagid_min_of_subset_size_and_dimension():
    stats = layer_stats(*_case("d_gt_n"))  # |A| = 32 < D = 40
    assert stats["PCAGID"] == 32
    assert stats["K"] == pytest.approx((50000 / math.pi) ** (1 / 32), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# degenerate inputs and pre-processing


def test_zero_norm_row_makes_the_cosine_terms_nan_and_selection_skips_it():
    xa, ya, xb, yb, n_train = _case("d_gt_n")
    xa = xa.clone()
    xa[0] = 0.0
    stats = layer_stats(xa, ya, xb, yb, n_train)
    for key in ("AvgIntra", "AvgInter", "AvgMinIntra", "S", "I", "sqrtIE", "Q"):
        assert math.isnan(stats[key]), key
    assert math.isfinite(stats["E"])
    assert select_layers({0: stats["Q"], 1: 0.5, 2: 0.7}, 2) == [1, 2]


def test_4d_features_above_the_limit_are_max_pooled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 513, 513, generator=g)  # D = 263 169 > 262 144 -> p = 2
    flat = flatten_features(x)
    assert flat.shape == (6, 256 * 256)
    assert torch.equal(flat, F.max_pool2d(x, 2).flatten(1))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    stats = layer_stats(x, labels, x, labels, 1000)
    assert stats["D"] == 256 * 256
    pooled = layer_stats(F.max_pool2d(x, 2), labels, F.max_pool2d(x, 2), labels, 1000)
    assert stats["Q"] == pytest.approx(pooled["Q"], rel=1e-12)


def test_3d_and_small_features_are_only_flattened():
    x = torch.zeros(2, 600, 500)  # 3-D above the limit: the reference did not pool these
    assert flatten_features(x).shape == (2, 300_000)
    assert flatten_features(torch.zeros(2, 4, 8, 8)).shape == (2, 256)
    assert MAX_DIMENSION == 262_144


def test_bad_inputs_raise_user_errors():
    xa, ya, xb, yb, n_train = _case("d_gt_n")
    with pytest.raises(DataError, match="fewer than 2 classes"):
        layer_stats(xa, torch.zeros_like(ya), xb, yb, n_train)
    with pytest.raises(DataError, match="do not match"):
        layer_stats(xa, ya[:-1], xb, yb, n_train)


# ---------------------------------------------------------------------------------------------
# subsets (METHOD 6.2, section 0 item 2)


def _pool_labels(counts: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(9))]


def test_subsets_are_balanced_sorted_and_sized():
    labels = _pool_labels([40, 30, 50])
    subset_a, subset_b = draw_subsets(labels, 3, subset_size=31, per_class_cap=20, seed=0)
    assert torch.bincount(labels[subset_a], minlength=3).tolist() == [10, 10, 10]  # floor(31 / 3)
    assert torch.bincount(labels[subset_b], minlength=3).tolist() == [20, 20, 20]  # min(20, 120 // 3)
    for subset in (subset_a, subset_b):
        assert torch.equal(subset, torch.sort(subset).values)
        assert subset.unique().numel() == subset.numel()
    with pytest.raises(ConfigError, match=r"class 1 has 30 samples.*subset B needs 40"):
        draw_subsets(labels, 3, subset_size=30, per_class_cap=500)  # B: min(500, 120 // 3) = 40


def test_subset_b_uses_floor_of_pool_over_classes():
    labels = _pool_labels([45, 45, 45])
    _, subset_b = draw_subsets(labels, 3, subset_size=30, per_class_cap=500, seed=0)
    assert torch.bincount(labels[subset_b]).tolist() == [45, 45, 45]  # min(500, 135 // 3)


def test_subsets_are_seeded():
    labels = _pool_labels([40, 30, 50])
    first = draw_subsets(labels, 3, subset_size=30, per_class_cap=20, seed=1)
    again = draw_subsets(labels, 3, subset_size=30, per_class_cap=20, seed=1)
    other = draw_subsets(labels, 3, subset_size=30, per_class_cap=20, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_exact_balanced_pool_is_used_whole_without_sampling():
    labels = _pool_labels([10, 10, 10])
    for seed in (0, 5):
        subset_a, subset_b = draw_subsets(labels, 3, subset_size=30, per_class_cap=10, seed=seed)
        assert torch.equal(subset_a, torch.arange(30)) and torch.equal(subset_b, torch.arange(30))
    _, capped = draw_subsets(labels, 3, subset_size=30, per_class_cap=9, seed=0)
    assert capped.numel() == 27  # more than the cap per class: B is sampled


def test_too_small_class_names_the_class_and_its_count():
    labels = _pool_labels([40, 5, 50])
    with pytest.raises(ConfigError, match=r"class 1 has 5 samples.*subset A needs 10"):
        draw_subsets(labels, 3, subset_size=30, per_class_cap=20)
    with pytest.raises(DataError, match="labels must lie"):
        draw_subsets(labels, 2)


def test_layer_quality_is_layer_stats_on_the_drawn_subsets():
    xa, ya, _, _, _ = _case("conv4d")
    subset_a, subset_b = draw_subsets(ya, 3, subset_size=15, per_class_cap=6, seed=4)
    expected = layer_stats(xa[subset_a], ya[subset_a], xa[subset_b], ya[subset_b], 777)
    got = layer_quality(xa, ya, 777, subset_size=15, per_class_cap=6, seed=4)
    assert got == expected


# ---------------------------------------------------------------------------------------------
# selection (METHOD section 0 item 4)


def test_select_layers_top_k_sorted_by_index_ties_to_lower_index():
    scores = {0: 1.0, 1: 3.0, 2: 3.0, 3: 2.0, 4: 3.0}
    assert select_layers(scores, 2) == [1, 2]
    assert select_layers(scores, 4) == [1, 2, 3, 4]
    assert select_layers({5: 9.0, 1: 8.0, 3: 7.0}, 2) == [1, 5]


def test_select_layers_never_picks_nan_and_checks_k():
    scores = {0: math.nan, 1: 1.0, 2: 2.0}
    assert select_layers(scores, 2) == [1, 2]
    with pytest.raises(ConfigError, match="only 2 layers"):
        select_layers(scores, 3)
    with pytest.raises(DataError, match="NaN"):
        select_layers(scores, 1, exclude_nan=False)
    with pytest.raises(ConfigError):
        select_layers({1: 1.0}, 0)


@pytest.mark.parametrize("dim, zero_information", [(64, True), (400, True), (600, False)])
def test_layer_quality_on_layers_narrower_than_subset_b_classes(dim, zero_information):
    # A user's call on 10 classes x 500 post-ReLU samples: the pool is exactly 5 000 balanced
    # samples, so A = B = the pool and n_max = 500. With D < 500 every class spectrum is shorter
    # than n_max, the summed k95 exceed D, the truncated rows reach the zero padding and the
    # reference's H_k = 0 (METHOD 6.5, quirk 12.6) gives I = 0 and Q = S; with D = 600 > n_max
    # there is no padding and I > 0.
    g = torch.Generator().manual_seed(dim)
    labels = torch.arange(10).repeat_interleave(500)
    means = torch.randn(10, dim, generator=g, dtype=torch.float64)
    features = (means[labels] + torch.randn(5000, dim, generator=g, dtype=torch.float64)).relu()
    stats = layer_quality(features, labels, 50_000)
    assert stats["D"] == dim
    if zero_information:
        assert stats["T"] > dim
        assert stats["I"] == 0.0 and stats["Q"] == stats["S"]
    else:
        assert stats["I"] > 0.0 and stats["Q"] > stats["S"]
