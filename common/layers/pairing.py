"""Which student layer each distilled teacher layer goes to: the student-layer maps (METHOD 4, 7).

The one home of the pairing rule, used by stage 2 (`common.distill.resolve_layer_lists`), the
layer-selection study's plan and its report. Pure functions of layer indices and relative depths;
no model, no file. A teacher layer i of n_teacher generalized layers sits at relative depth
(i+1)/n_teacher, a student layer j of n_student at (j+1)/n_student; depths are Fractions, so a
tie is a tie. Taking depths (not indices) lets one call pair the layers of several teachers at once.

Maps (`method.student_layers`):

* `baseline`: the student's baseline list, in order (what every run did before the maps);
* `depth`: each teacher layer to the student layer at the nearest relative depth
  (`depth_student_layers`);
* `Q`: the student's own top-k layers by Q (from the profile of a CE-trained student), paired in
  depth order (`in_depth_order`): the shallowest teacher layer with the shallowest student layer;
* an explicit list, paired in the order given.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

STUDENT_MAPS = ("baseline", "depth", "Q")  # the words of method.student_layers; else an explicit list
MAPPED = ("depth", "Q")  # the maps resolved against the teacher layers (the run key holds what they resolve to)


def relative_depth(layer: int, n_layers: int) -> Fraction:
    """(layer+1)/n_layers: 1 is the model's last generalized layer."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} of a model with {n_layers} generalized layers")
    return Fraction(layer + 1, n_layers)


def nearest_student_layer(teacher_layer: int, n_teacher: int, n_student: int) -> int:
    """The student layer j whose relative depth is nearest to the teacher layer's. Ties go to the
    deeper j, so the student layer has done at least as much of its network as the teacher layer.
    The single-layer arms of the study use it; `depth_student_layers` of one layer equals it."""
    if n_student < 1:
        raise ValueError(f"a student of {n_student} layers")
    return depth_student_layers([relative_depth(teacher_layer, n_teacher)], range(n_student), n_student)[0]


def depth_student_layers(depths: Sequence[Fraction], candidates: Sequence[int], n_student: int) -> list[int]:
    """Distinct student layers for teacher layers at relative `depths`, one each, in the order given.

    The rule: among the strictly increasing assignments of `candidates` to the teacher layers taken
    in depth order (equal depths keep their given order), the one with the least total distance
    |depth - (j+1)/n_student|; of equally near ones, the deepest (the lexicographically greatest
    list). Without collisions this is each layer's own nearest student layer (ties deeper, as
    `nearest_student_layer`); where two teacher layers would share a student layer, the optimum
    moves one of them to a neighbour, so the student layers stay distinct and in depth order.
    Raises ValueError when there are fewer candidates than depths (the caller words the error).
    """
    cands = sorted(set(int(j) for j in candidates))
    k = len(depths)
    if len(cands) < k:
        raise ValueError(f"{k} teacher layers but only {len(cands)} student layers to pair them with")
    if k == 0:
        return []
    order = sorted(range(k), key=lambda i: depths[i])  # stable: equal depths keep their order
    cost = [[abs(depths[i] - Fraction(j + 1, n_student)) for j in cands] for i in order]
    # best[j]: (cost, -sequence) of the best increasing assignment of the first r+1 layers ending at cands[j]
    best: list[tuple[Fraction, tuple[int, ...]] | None] = [(cost[0][j], (-cands[j],)) for j in range(len(cands))]
    for r in range(1, k):
        nxt: list[tuple[Fraction, tuple[int, ...]] | None] = [None] * len(cands)
        running: tuple[Fraction, tuple[int, ...]] | None = None  # best over positions < j
        for j in range(len(cands)):
            if running is not None:
                nxt[j] = (running[0] + cost[r][j], running[1] + (-cands[j],))
            if best[j] is not None and (running is None or best[j] < running):
                running = best[j]
        best = nxt
    chosen = min(b for b in best if b is not None)[1]
    out = [0] * k
    for position, i in enumerate(order):
        out[i] = -chosen[position]
    return out


def in_depth_order(depths: Sequence[Fraction], student_layers: Sequence[int], ties: Sequence[Any] | None = None) -> list[int]:
    """`student_layers` (a set of k) re-ordered so the i-th shallowest teacher layer gets the i-th
    shallowest student layer; returned in the teacher layers' given order. Equal depths are
    ordered by `ties` (ascending: a larger key takes the deeper student layer; several teachers
    pass (layer index, teacher), so the deeper network's layer goes deeper), else kept in the
    given order."""
    if len(depths) != len(student_layers):
        raise ValueError(f"{len(depths)} teacher layers but {len(student_layers)} student layers")
    ranked = sorted(int(j) for j in student_layers)
    order = sorted(range(len(depths)), key=lambda i: (depths[i], ties[i]) if ties is not None else depths[i])
    out = [0] * len(depths)
    for position, i in enumerate(order):
        out[i] = ranked[position]
    return out


def random_layer_lists(candidates: Sequence[int], k: int, taken: set[tuple[int, ...]], draws: int, seed: int) -> list[tuple[int, ...]]:
    """Draw d (1-based): k distinct layers from `candidates`, sorted (depth order), from
    numpy's default_rng([seed, d]), drawn again while the list is in `taken` or drawn before (two
    arms with one list would share their runs). Stops early when every k-list is taken; adding a
    draw keeps the earlier ones."""
    pool = np.array(sorted(set(int(j) for j in candidates)))
    taken = set(taken)
    out: list[tuple[int, ...]] = []
    for d in range(1, draws + 1):
        if len(pool) < k or len(taken) >= math.comb(len(pool), k):
            break
        rng = np.random.default_rng([seed, d])
        drawn = tuple(sorted(int(j) for j in rng.choice(pool, size=k, replace=False)))
        while drawn in taken:
            drawn = tuple(sorted(int(j) for j in rng.choice(pool, size=k, replace=False)))
        taken.add(drawn)
        out.append(drawn)
    return out
