"""bench/bench_stream.py's pure helpers (not its timings): the process tree, the halved dataset,
and the counting behind its ImageNet arithmetic."""
from __future__ import annotations

import pytest

from bench.bench_stream import Costs, children_of, gram_flops, imagenet_arithmetic, link_half, plan_for, sliced_layers, subset_seconds


def test_children_of_walks_the_whole_tree_and_nothing_else():
    parents = {2: 1, 3: 2, 4: 1, 5: 9, 6: 3, 9: 0}
    assert sorted(children_of(parents, 1)) == [2, 3, 4, 6]
    assert children_of(parents, 4) == []


def test_link_half_links_the_first_half_of_every_class_folder(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    for which, n in (("train", 4), ("val", 2)):
        for wnid in ("n0", "n1"):
            folder = full / which / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.JPEG").write_bytes(b"x" * (i + 1))
    link_half(full, half)
    assert sorted(p.name for p in (half / "train" / "n1").iterdir()) == ["0.JPEG", "1.JPEG"]
    assert [p.name for p in (half / "val" / "n0").iterdir()] == ["0.JPEG"]
    assert (half / "train" / "n0" / "1.JPEG").stat().st_ino == (full / "train" / "n0" / "1.JPEG").stat().st_ino


def test_gram_flops_counts_the_lower_block_triangle():
    assert gram_flops(500, 10) == 2.0 * 10 * 500**2  # one block: the whole Gram
    assert gram_flops(2048, 10) == 2.0 * 10 * 3 * 1024**2  # 2 x 2 blocks, 3 in the lower triangle


def test_plan_for_slices_under_the_budget_and_counts_what_the_plans_do():
    dims = {0: 1000, 1: 4000, 2: 500}
    budget = 20_000 * 4 + 2 * 10 * 10 * 8  # room for 20 000 floats of |A| = 10 rows plus two Grams
    plan = plan_for(dims, n_a=10, n_b_class=3, budget_bytes=budget)
    assert plan.a_max_bytes <= budget
    assert len(plan.a_passes) > 1 and {i for p in plan.a_passes for i in p} == set(dims)
    assert sliced_layers(plan) == [1]  # 4 000 columns of 10 rows cannot share a pass with the others
    assert plan.b_groups == ((0, 1, 2),) and plan.b_max_bytes == 3 * 5500 * 4


def test_arithmetic_counts_the_plans_work_and_scales_the_measurement_by_it():
    costs = Costs(decode_s=0.01, to_layer_s={0: 0.1, 1: 0.2}, flatten_s={0: 0.0, 1: 0.0}, gemm64_flops=1e9,
                  dims={0: 100, 1: 100}, index_bytes_per_image=48)
    plan = plan_for(costs.dims, n_a=4, n_b_class=2, budget_bytes=1 << 30)
    here = subset_seconds(plan, n_a=4, n_b=8, b_per_class=2, classes=4, costs=costs)
    assert here["a_forward_s"] == pytest.approx(4 * 0.21)  # one pass to layer 1
    assert here["a_recheck_s"] == 0.0  # nothing sliced: the re-check reads the held rows
    assert here["b_gram_s"] == pytest.approx(4 * 2 * 2**2 * 200 / 1e9)  # 4 classes of 2
    there = {k: 10 * v for k, v in here.items()}
    out = imagenet_arithmetic(3.0, 5.0, here, there)
    assert out["a_scaled_s"] == pytest.approx(30.0) and out["b_scaled_s"] == pytest.approx(50.0)
    assert out["a_counted_s"] == pytest.approx(10 * (here["a_forward_s"] + here["a_gram_s"]))
