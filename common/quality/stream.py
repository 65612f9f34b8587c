"""S, I, E, Q of many layers from forward passes, with memory bounded by a budget (METHOD 6.6).

`common.quality.formulas.layer_stats` needs one layer's features of subsets A and B in memory. At the
paper's scale that is far too much to dump (a full-width ResNet34 on CIFAR-100: 2 MB per image
for all layers, B = the whole training set), and it is not needed:

* statistic 7 on subset B needs, per class and layer, only the spectrum of that class's centred
  features (n_k <= 500 rows). B is walked class by class; for each class one forward gives every
  layer of a group that fits the budget, and only the spectra are kept.
* statistics 4 and 6 on subset A need the |A| x |A| Gram per layer (5 000^2 float64 = 200 MB)
  plus the raw rows of the few candidate pairs of the exact minimum-distance re-check. A's
  features are held for a group of layers that fits the budget, then dropped; a layer too wide
  for the budget is held in column slices, its Gram summed over them, and the re-check rows are
  recomputed by a forward of just those images. Re-running the teacher over A once per group
  costs little next to writing every layer to disk.

Everything lives on `device` (the teacher's), so on a GPU the Grams and spectra are computed
there. Results equal `layer_stats` on the same subsets to rounding (float64 throughout; the
golden and equality tests in tests/test_quality.py hold it to 1e-5 relative).

What the budget bounds (`profile.memory_budget_mb`), on the device: the Grams, the held
features and the float64 working copies the formulas make of them (a chunk of columns
converted for a Gram, a centred class chunk, the re-check's row batches and recomputed rows).
A working copy holds at most `working_elements(budget)`: the formulas' 128 MiB chunk, or a
quarter of the budget when that is less; the passes are planned in what it leaves, and the
class spectra's small Grams (3 x max_k |B_k|^2 float64) are set aside too. Outside it: one
batch of the source (the teacher's forward, every layer the pass asks for, whole) and the
host's small results. tests/test_quality_stream.py measures the bytes allocated against it; on
CUDA the profile logs the allocator's peak per step beside the budget (`device_peak`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from common.runtime import release_free_memory

from common.quality.formulas import (
    _CHUNK_ELEMENTS,
    _exact_min_sq_distance,
    accumulate_gram,
    class_spectrum,
    explained_variance_rows,
    flatten_features,
    geometry_from_gram,
    statistics_to_quality,
    symmetrize_gram,
)

# Features of `layers` for the training-split `positions` (at most one batch): raw per-sample
# tensors [n, ...] in float32 on the compute device, as the teacher's generalized layers give them.
FeatureSource = Callable[[Tensor, list[int]], dict[int, Tensor]]

_FLOAT32 = 4
_FLOAT64 = 8
WORKING_SHARE = 4  # a float64 working copy takes at most 1/WORKING_SHARE of the budget
SPECTRUM_COPIES = 3  # a class spectrum's Gram, eigvalsh's copy of it, and the narrow layers' centred rows


def working_elements(budget_bytes: int) -> int:
    """Float64 elements one working copy may hold under `budget_bytes` (module docstring)."""
    return max(1, min(_CHUNK_ELEMENTS, budget_bytes // (WORKING_SHARE * _FLOAT64)))


@contextlib.contextmanager
def device_peak(device: torch.device) -> Iterator[list[int | None]]:
    """[bytes]: the CUDA allocator's peak above what was allocated when the block began (set
    when it ends), the budget's account on a GPU; [None] on other devices, which keep no such
    count. It resets the device's peak statistics (nothing else in stage 1 reads them)."""
    peak: list[int | None] = [None]
    if device.type != "cuda" or not torch.cuda.is_available():
        yield peak
        return
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        torch.cuda.synchronize(device)
        peak[0] = torch.cuda.max_memory_allocated(device) - start


def flat_dim(shape: Sequence[int]) -> int:
    """D of a layer after `flatten_features` (4-D maps above MAX_DIMENSION are max-pooled, METHOD 6.3)."""
    return int(flatten_features(torch.empty((1, *shape), device="meta")).shape[1])


@dataclass(frozen=True)
class Slice:
    """Columns [start, stop) of one layer's flattened features, held during one pass over A."""

    layer: int
    start: int
    stop: int
    dim: int  # the layer's whole flattened D

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.dim


def plan_subset_a(dims: dict[int, int], n_a: int, budget_bytes: int) -> list[list[Slice]]:
    """Passes over subset A: each holds column slices whose features plus open Grams fit the budget.

    Sized for float32 features (what a teacher gives); float64 sources (tests) take twice that.

    Layers go in index order; one Gram (n_a^2 float64) is counted per layer a pass touches, and a
    layer wider than what is left of the budget is cut into slices. A pass always takes at least
    one column, so a budget below one Gram still makes progress (it is then exceeded, not hung).
    """
    gram_bytes = n_a * n_a * _FLOAT64
    passes: list[list[Slice]] = []
    current: list[Slice] = []
    used = 0
    for layer in sorted(dims):
        dim, start = dims[layer], 0
        while start < dim:
            room = budget_bytes - used - gram_bytes
            cols = min(dim - start, room // (n_a * _FLOAT32)) if room > 0 else 0
            if cols < 1 and current:
                passes.append(current)
                current, used = [], 0
                continue
            cols = max(cols, 1)
            current.append(Slice(layer, start, start + cols, dim))
            used += gram_bytes + n_a * cols * _FLOAT32
            start += cols
    if current:
        passes.append(current)
    return passes


def plan_subset_b(dims: dict[int, int], n_max: int, budget_bytes: int) -> list[list[int]]:
    """Groups of layers whose features of one class of subset B (n_max rows) fit the budget."""
    groups: list[list[int]] = []
    used = 0
    for layer in sorted(dims):
        size = n_max * dims[layer] * _FLOAT32
        if groups and used + size <= budget_bytes:
            groups[-1].append(layer)
            used += size
        else:
            groups.append([layer])
            used = size
    return groups


def _batches(positions: Tensor, batch_size: int) -> list[Tensor]:
    return list(positions.split(batch_size))


def _flat(features: dict[int, Tensor]) -> dict[int, Tensor]:
    """Flattened (METHOD 6.3) features; half precision is widened, float64 (tests) kept as is."""
    return {
        layer: flatten_features(x if x.dtype in (torch.float32, torch.float64) else x.float())
        for layer, x in features.items()
    }


def geometry_of_subset_a(
    source: FeatureSource,
    dims: dict[int, int],
    positions: Tensor,
    labels: Tensor,
    *,
    device: torch.device,
    budget_bytes: int,
    batch_size: int,
) -> dict[int, dict[str, float]]:
    """Statistics 4 and 6 (`geometry_from_gram`) of every layer in `dims` on subset A.

    positions: subset A's training-split positions; labels: their labels (same order).
    """
    order = torch.argsort(labels, stable=True)  # class-contiguous rows: the Gram needs no reordering
    positions, labels = positions[order], labels[order]
    n_a = len(positions)
    work = working_elements(budget_bytes)
    out: dict[int, dict[str, float]] = {}
    grams: dict[int, Tensor] = {}
    for slices in plan_subset_a(dims, n_a, budget_bytes - work * _FLOAT64):
        held = _hold_rows(source, slices, positions, device, batch_size)
        for s in slices:
            if s.layer not in grams:  # no local name: a finished Gram must not outlive its layer
                grams[s.layer] = torch.zeros(n_a, n_a, dtype=torch.float64, device=device)
            accumulate_gram(grams[s.layer], held[s], work)
            if s.stop == s.dim:  # the layer's last slice: its Gram is complete
                out[s.layer] = _finish_layer(source, grams.pop(s.layer), held[s] if s.whole else None, positions, labels, s, device, batch_size, work)
            del held[s]  # each buffer is freed as soon as it is used: the next pass starts empty
        release_free_memory()
    return out


def _hold_rows(
    source: FeatureSource, slices: list[Slice], positions: Tensor, device: torch.device, batch_size: int
) -> dict[Slice, Tensor]:
    """One pass over `positions`: each slice's columns of every row, in the features' dtype,
    filled batch by batch (only one batch of the source is alive beside them)."""
    layers = sorted({s.layer for s in slices})
    held: dict[Slice, Tensor] = {}
    row = 0
    for batch in _batches(positions, batch_size):
        feats = _flat(source(batch, layers))
        for s in slices:
            if s not in held:  # allocated at the first batch, in the features' dtype
                held[s] = torch.empty(len(positions), s.stop - s.start, dtype=feats[s.layer].dtype, device=device)
            held[s][row : row + len(batch)] = feats[s.layer][:, s.start : s.stop]
        row += len(batch)
        del feats  # before the source makes the next batch
    return held


def _finish_layer(
    source: FeatureSource, gram: Tensor, whole: Tensor | None, positions: Tensor, labels: Tensor, s: Slice,
    device: torch.device, batch_size: int, work: int,
) -> dict[str, float]:
    """Statistics 4 and 6 from a complete Gram; the re-check reads `whole` (the layer's every
    column) or, for a layer held in slices, recomputes its few rows with the source."""
    symmetrize_gram(gram)
    if whole is not None:
        resolve = _resolve_from(whole, device, work)
    else:
        resolve = _resolve_by_forward(source, positions, s, device, batch_size, work)
    return geometry_from_gram(gram, gram.diagonal().clone(), labels, s.dim, resolve, work)


def _resolve_from(x: Tensor, device: torch.device, work: int) -> Callable[[list[tuple[Tensor, Tensor]]], list[float]]:
    def resolve(candidates: list[tuple[Tensor, Tensor]]) -> list[float]:
        return [_exact_min_sq_distance(x, rows, cols, device, work) for rows, cols in candidates]

    return resolve


def _resolve_by_forward(
    source: FeatureSource, positions: Tensor, s: Slice, device: torch.device, batch_size: int, work: int
) -> Callable[[list[tuple[Tensor, Tensor]]], list[float]]:
    """The re-check of a layer held in slices: its candidates' rows recomputed by the source, in
    groups of pairs whose float32 rows take half a working copy (the float64 batches of
    `_exact_min_sq_distance` the other half), so even massive ties stay within the budget."""
    whole = Slice(s.layer, 0, s.dim, s.dim)
    pairs_per_group = max(1, work // max(1, s.dim) // 2)  # two rows a pair at most

    def resolve(candidates: list[tuple[Tensor, Tensor]]) -> list[float]:
        best = [math.inf if r.numel() else math.nan for r, _ in candidates]
        klass = torch.cat([torch.full((r.numel(),), k, dtype=torch.long) for k, (r, _) in enumerate(candidates)])
        rows_all = torch.cat([r for r, _ in candidates]).cpu()
        cols_all = torch.cat([c for _, c in candidates]).cpu()
        for g in range(0, len(rows_all), pairs_per_group):
            r, c, k = rows_all[g : g + pairs_per_group], cols_all[g : g + pairs_per_group], klass[g : g + pairs_per_group]
            rows = torch.unique(torch.cat([r, c]))
            x = _hold_rows(source, [whole], positions[rows], device, batch_size)[whole]
            where = torch.full((len(positions),), -1, dtype=torch.long)
            where[rows] = torch.arange(len(rows))
            for cls in torch.unique(k).tolist():
                mine = k == cls
                best[cls] = min(best[cls], _exact_min_sq_distance(x, where[r[mine]], where[c[mine]], device, work // 2))
            del x
        return best

    return resolve


def spectra_of_subset_b(
    source: FeatureSource,
    dims: dict[int, int],
    positions: Tensor,
    labels: Tensor,
    *,
    device: torch.device,
    budget_bytes: int,
    batch_size: int,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Statistic 7 of every layer in `dims` on subset B: (lam, lengths) per layer, class by class."""
    classes, counts = torch.unique(labels, return_counts=True)
    n_max = int(counts.max())  # METHOD 6.5 pads every row to max_k |B_k|, whatever D is
    work = working_elements(budget_bytes)
    spectra: dict[int, list[Tensor]] = {layer: [] for layer in dims}
    for layers in plan_subset_b(dims, n_max, budget_bytes - (work + SPECTRUM_COPIES * n_max * n_max) * _FLOAT64):
        for c in classes:
            members = positions[labels == c]
            held = _hold_rows(source, [Slice(layer, 0, dims[layer], dims[layer]) for layer in layers], members, device, batch_size)
            for s in list(held):
                spectra[s.layer].append(class_spectrum(held.pop(s), device, work))  # each layer freed once used
            release_free_memory()  # else the heap keeps every class's freed batches, fragmented
    return {layer: explained_variance_rows(s2, n_max) for layer, s2 in spectra.items()}


def stream_layer_stats(
    source: FeatureSource,
    shapes: dict[int, tuple[int, ...]],
    subset_a: Tensor,
    labels_a: Tensor,
    subset_b: Tensor,
    labels_b: Tensor,
    n_train: int,
    *,
    device: torch.device,
    budget_bytes: int,
    batch_size: int,
    on_step: Callable[[int | None], None] = lambda peak: None,
) -> dict[int, dict[str, float]]:
    """`layer_stats` of every layer in `shapes` (per-sample shapes) without holding a whole layer.

    subset_a / subset_b: training-split positions of the Q subsets; labels_*: their labels;
    n_train: the training-set size for K. Memory: `budget_bytes` of features, Grams and their
    float64 copies on `device`, plus one batch of the source (module docstring). on_step: called
    after subset A and after subset B with the step's `device_peak` (stage 1 logs each step's cost).
    """
    dims = {layer: flat_dim(shape) for layer, shape in shapes.items()}
    with device_peak(device) as peak:
        geometry = geometry_of_subset_a(
            source, dims, subset_a.cpu(), labels_a.cpu(), device=device, budget_bytes=budget_bytes, batch_size=batch_size
        )
    on_step(peak[0])
    with device_peak(device) as peak:
        spectra = spectra_of_subset_b(
            source, dims, subset_b.cpu(), labels_b.cpu(), device=device, budget_bytes=budget_bytes, batch_size=batch_size
        )
    on_step(peak[0])
    return {
        layer: statistics_to_quality(geometry[layer], *spectra[layer], n_a=len(subset_a), dim=dims[layer], n_train=n_train)
        for layer in sorted(dims)
    }
