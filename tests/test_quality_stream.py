"""Streaming S/I/E/Q (common/quality/stream.py) equals `layer_stats` on the same subsets."""
from __future__ import annotations

import pytest
import torch

from common.quality.formulas import layer_stats
from common.quality.stream import flat_dim, plan_subset_a, plan_subset_b, stream_layer_stats
from tests.test_quality import GEN, GOLDEN, STAT_KEYS


class PoolSource:
    """A FeatureSource over fixed per-layer tensors; records the largest batch it was asked for."""

    def __init__(self, layers: dict[int, torch.Tensor]) -> None:
        self.layers, self.largest, self.calls = layers, 0, 0

    def __call__(self, positions: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        self.largest, self.calls = max(self.largest, len(positions)), self.calls + 1
        return {i: self.layers[i][positions] for i in layers}


def _pool(xa, ya, xb, yb):
    """Subsets A and B as positions of one pool (A first), as stage 1 sees the training split."""
    pool = torch.cat([xa, xb])
    labels = torch.cat([ya, yb])
    a = torch.arange(len(xa))
    b = torch.arange(len(xa), len(xa) + len(xb))
    return pool, labels, a, b


def _assert_same(stats, expected):
    for key in STAT_KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-5, abs=0.0), key


@pytest.mark.parametrize("name", sorted(GEN.CASES))
@pytest.mark.parametrize("budget", [1 << 30, 1])  # everything at once / one column per pass
def test_streaming_equals_layer_stats_on_every_golden_case(name, budget):
    xa, ya, xb, yb, n_train = (torch.from_numpy(v) if not isinstance(v, int) else v for v in GEN.case_inputs(name))
    pool, labels, a, b = _pool(xa, ya, xb, yb)
    source = PoolSource({7: pool})
    stats = stream_layer_stats(
        source, {7: tuple(pool.shape[1:])}, a, labels[a], b, labels[b], n_train,
        device=torch.device("cpu"), budget_bytes=budget, batch_size=5,
    )
    _assert_same(stats[7], layer_stats(xa, ya, xb, yb, n_train))
    # and the independent re-derivation itself: both paths could share a regression (they did,
    # when Lambda was padded to the longest spectrum instead of n_max = max_k |B_k|)
    _assert_same(stats[7], GOLDEN[name]["expected"])
    assert source.largest <= 5


def test_streaming_handles_near_duplicates_across_classes_in_split_layers():
    # a large common offset with cross-class near-duplicates (~1e-6 apart): the Gram's distance
    # trick cancels, so the exact re-check must run, here on rows recomputed by the source
    g = torch.Generator().manual_seed(0)
    n_per, classes, dim = 12, 4, 48
    x = 1000.0 + torch.randn(n_per * classes, dim, generator=g, dtype=torch.float64)
    y = torch.arange(classes).repeat_interleave(n_per)
    for c in range(1, classes):
        x[c * n_per] = x[0] + 1e-6 * torch.randn(dim, generator=g, dtype=torch.float64)
    layers = {0: x, 1: x.relu().reshape(-1, 3, 4, 4), 2: (x - 1000.0).reshape(-1, 6, 8)}
    shapes = {i: tuple(t.shape[1:]) for i, t in layers.items()}
    a = torch.arange(len(x))
    b = torch.arange(len(x))
    expected = {i: layer_stats(t, y, t, y, 50_000) for i, t in layers.items()}
    n_a = len(a)
    # all layers in one pass / 5-column slices (of float64: 10 planned float32 columns), with a
    # quarter of the budget set aside for the float64 working copy
    for budget in (1 << 30, -(-(n_a * n_a * 8 + n_a * 8 * 5) * 4 // 3)):
        stats = stream_layer_stats(PoolSource(layers), shapes, a, y, b, y, 50_000, device=torch.device("cpu"), budget_bytes=budget, batch_size=7)
        for i in layers:
            _assert_same(stats[i], expected[i])
    assert expected[0]["AvgMinInterDist"] < 1e-4  # the case really is near-duplicate


def test_plan_a_keeps_each_pass_within_the_budget_and_covers_every_column():
    dims = {0: 1000, 1: 300, 2: 40, 3: 7}
    n_a, budget = 10, 10 * 10 * 8 + 10 * 4 * 250  # one Gram + 250 columns
    passes = plan_subset_a(dims, n_a, budget)
    for slices in passes:
        cost = len({s.layer for s in slices}) * n_a * n_a * 8 + sum(n_a * (s.stop - s.start) * 4 for s in slices)
        assert cost <= budget
    for layer, dim in dims.items():
        cols = sorted((s.start, s.stop) for p in passes for s in p if s.layer == layer)
        assert cols[0][0] == 0 and cols[-1][1] == dim
        assert all(prev[1] == nxt[0] for prev, nxt in zip(cols, cols[1:]))
    assert len(passes) > 1


def test_plan_b_groups_layers_by_class_features_size():
    assert plan_subset_b({0: 100, 1: 100, 2: 100, 3: 500}, n_max=10, budget_bytes=10 * 4 * 200) == [[0, 1], [2], [3]]
    assert plan_subset_b({0: 100, 1: 100}, n_max=10, budget_bytes=1 << 30) == [[0, 1]]


def test_flat_dim_follows_the_pooling_rule():
    assert flat_dim((5, 7)) == 35
    assert flat_dim((64, 32, 32)) == 65536
    assert flat_dim((64, 128, 128)) == 64 * 64 * 64  # D = 1 048 576 > 262 144: p = 2
    assert flat_dim((64, 130, 130)) == 64 * 43 * 43  # p = ceil(sqrt(1 081 600 / 262 144)) = 3, floor


@pytest.mark.parametrize("budget", [1 << 30, 60_000])  # one pass / the wide layer in column slices
def test_the_float64_flop_count_is_what_the_streaming_profile_multiplies(budget, monkeypatch):
    """bench/bench_quality.py's `float64_flops` (docs/gpus.md's estimate of stage 1 on a GPU)
    counts the matrix products S/I/E/Q runs: torch's FlopCounterMode over a run agrees exactly.
    Small row blocks give subset A's Gram several blocks; layer 2 is narrower than a class of B."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.bench_quality import float64_flops
    from common.quality import formulas

    monkeypatch.setattr(formulas, "_ROW_BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(25)  # 100 images of 4 classes
    layers = {0: torch.randn(100, 8, 5, 5, generator=g), 1: torch.randn(100, 60, generator=g), 2: torch.randn(100, 3, 2, generator=g)}
    a, b = torch.arange(0, 100, 2), torch.arange(1, 100, 2)  # A: 50 rows; B: 4 classes of 12-13
    shapes = {i: tuple(x.shape[1:]) for i, x in layers.items()}
    addmm_ = {torch.ops.aten.addmm_: lambda self_shape, a_shape, b_shape, *args, **kwargs: 2 * a_shape[0] * a_shape[1] * b_shape[1]}
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        stream_layer_stats(PoolSource(layers), shapes, a, y[a], b, y[b], 50_000, device=torch.device("cpu"), budget_bytes=budget, batch_size=16)
    sizes = torch.bincount(y[b]).tolist()
    counted = float64_flops({i: flat_dim(s) for i, s in shapes.items()}, len(a), sizes)
    assert counter.get_total_flops() == sum(f["gram_a"] + f["gram_b"] for f in counted.values())
    assert min(sizes) > flat_dim(shapes[2])  # the D < n_k branch was counted too
