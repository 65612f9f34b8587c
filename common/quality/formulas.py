"""Knowledge quality Q = S + sqrt(I * E) of one teacher layer, and top-k layer selection.

Implements METHOD section 6 (6.2-6.6) and section 0 items 1, 2 and 4. The reference is replicated
*quirks included* (METHOD 0.1, 12.4-12.7); each quirk is named where it is implemented:

* AvgIntra is the mean |cos| over the FULL m x m class block, diagonal (= 1) included (12.4).
* The spectrum truncation T is the SUM over classes of the per-class 95 % dimensions (12.5).
* I is normalised by the hard-coded constant ln 5 (12.8).
* E carries K = (N_train / pi)^(1 / PCAGID) with PCAGID = min(|A|, D) (12.7).
* H_k = 0 when the truncated spectrum of class k holds an exact zero (12.6). The exact zeros are
  the zero padding past the class's own spectrum length min(n_k, D) up to n_max = max_k |B_k|
  (so a layer with D < T <= n_max gets H_k = 0 in every class: I = 0, Q = S); values that are zero only
  up to rounding (rank deficiency) are ordinary spectrum entries, as in the reference, whose
  float32 SVD returns them as tiny non-zeros (0 * ln 0 counts as 0 there).

Numerics: all statistics are float64. The |A| x |A| Gram matrix X X^T is built with matmuls over
feature chunks (memory n*chunk + n^2, never n x n x D) and serves both the cosines and the squared
distances ||a||^2 + ||b||^2 - 2<a, b>. That distance trick cancels when two samples are close
relative to their norms, so the minimum inter-class distance is re-computed directly for every
pair that a rigorous rounding bound cannot rule out. Class spectra (statistic 7) are the
eigenvalues of the float64 Gram of the centred class matrix (its smaller side), i.e. squared
singular values, accurate to ~1e-16 of the total variance.

Degenerate inputs: a zero-norm feature row in subset A has an undefined cosine, as in the
reference; NaN then propagates to AvgIntra, AvgInter, AvgMinIntra, S, I, sqrtIE and Q of that
layer (E stays finite; an all-zero layer, AvgNorm = 0, makes E NaN too), and `select_layers`
skips NaN (and infinite) scores: NaN means "undefined" for that layer. A class of subset B with
zero total variance gives NaN ratios exactly like the reference: its k95 is 1 (the reference's
while loop stops at the first NaN comparison) and its entropy is set to 0. A constant non-zero
layer is well defined: every |cos| is 1 and every spectrum zero, so S = I = Q = 0 (E = 0 when
all rows are equal). Non-finite features (an overflowing layer) give NaN spectra rather than a
failed eigensolver, so the layer is undefined, not fatal.

One module, although over 400 lines: it is METHOD 6 end to end (subsets, Gram geometry, class
spectra, the S/I/E/Q formulas, selection), each step a small function named after its symbol, and
the steps share the quirks listed above and the float64 Gram numerics; split, one formula would
be read across several files. What is held in memory lives apart, in common/quality/stream.py.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from common.errors import ConfigError, DataError

MAX_DIMENSION = 262_144  # `iMaxDimension` of the reference (METHOD 6.3)
VARIANCE_THRESHOLD = 0.95  # per-class 95 % dimension (METHOD 6.5)
ENTROPY_NORMALISER = math.log(5)  # hard-coded ln 5 (METHOD 6.5, item 12.8)

_CHUNK_ELEMENTS = 1 << 24  # float64 elements per temporary chunk (128 MiB)
_ROW_BLOCK = 1024  # row block of the Gram; lower-triangle blocks only
_MAX_CANDIDATES = 4096  # per class; more only for massive exact ties (then: the smallest by bound)
_UNIT_ROUNDOFF = 2.0 ** -53


# --------------------------------------------------------------------------------------------
# Subsets (METHOD 6.2, section 0 item 2)


def draw_subsets(
    labels: Tensor,
    num_classes: int,
    *,
    subset_size: int = 5000,
    per_class_cap: int = 500,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Seeded class-balanced subsets A and B (METHOD 6.2, section 0 item 2).

    A: floor(subset_size / C) samples per class; B: min(per_class_cap, floor(n_pool / C)) per
    class; each drawn like the reference's `GetRandomSubset` (the first samples of a random
    permutation of each class), A first, then B, from one generator seeded with `seed`. If the
    pool holds exactly `subset_size` samples, balanced, with at most `per_class_cap` per class,
    nothing is sampled and both subsets are the whole pool.

    Returns sorted int64 positions into `labels` (A, B).
    """
    labels = labels.detach().reshape(-1).to("cpu", torch.long)
    n_pool = labels.numel()
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if n_pool and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}), found [{int(labels.min())}, {int(labels.max())}]; "
            "pass the dataset's number of classes"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    per_a = subset_size // num_classes
    per_b = min(per_class_cap, n_pool // num_classes)
    if per_a < 1:
        raise ConfigError(
            f"subset_size={subset_size} gives 0 samples per class for {num_classes} classes; "
            f"set profile.subset_size >= {num_classes}"
        )
    if per_b < 1:
        raise ConfigError(
            f"per_class_cap={per_class_cap} with a pool of {n_pool} gives 0 samples per class for subset B; "
            "set profile.per_class_cap >= 1 and use a pool with at least one sample per class"
        )

    whole = torch.arange(n_pool)
    if n_pool == subset_size and bool((counts == per_a).all()) and per_a <= per_class_cap:
        return whole, whole.clone()

    for name, need, key in (("A", per_a, "subset_size"), ("B", per_b, "per_class_cap")):
        short = (counts < need).nonzero().flatten()
        if short.numel():
            c = int(short[0])
            raise ConfigError(
                f"class {c} has {int(counts[c])} samples in the pool but subset {name} needs {need} per class; "
                f"lower profile.{key} or use a larger pool (profile.pool_size; empty: the whole training split)"
            )

    by_class = torch.argsort(labels, stable=True).split(counts.tolist())
    generator = torch.Generator().manual_seed(seed)

    def balanced(per_class: int) -> Tensor:
        picks = [idx[torch.randperm(idx.numel(), generator=generator)[:per_class]] for idx in by_class]
        return torch.sort(torch.cat(picks)).values

    subset_a = balanced(per_a)
    subset_b = balanced(per_b)
    return subset_a, subset_b


# --------------------------------------------------------------------------------------------
# Pre-processing (METHOD 6.3)


def flatten_features(x: Tensor) -> Tensor:
    """One layer's features [n, ...] as [n, D] (METHOD 6.3).

    4-D tensors with D > 262 144 are first max-pooled spatially with a p x p window, stride p,
    p = ceil(sqrt(D / 262 144)) (the reference's rule). Other ranks are flattened as they are
    (3-D token tensors: tokens * dim; the reference did not handle large 3-D tensors).
    """
    n = x.shape[0]
    dim = math.prod(x.shape[1:])
    if x.dim() != 4 or dim <= MAX_DIMENSION:
        return x.reshape(n, dim)
    p = math.ceil(math.sqrt(dim / MAX_DIMENSION))
    rows = max(1, _CHUNK_ELEMENTS // (2 * dim))
    pooled = []
    for i in range(0, n, rows):
        chunk = x[i : i + rows]
        if chunk.dtype in (torch.float16, torch.bfloat16):  # CPU pooling kernels want float32+
            chunk = chunk.float()
        pooled.append(F.max_pool2d(chunk, (p, p)).flatten(1))
    return torch.cat(pooled)


# --------------------------------------------------------------------------------------------
# Statistics 4 and 6 on subset A (METHOD 6.4)


def _chunk(chunk_elements: int | None) -> int:
    """Float64 elements a working copy may hold: the caller's bound (the streaming profile derives
    it from its memory budget), else _CHUNK_ELEMENTS. Chunking changes only the rounding."""
    return _CHUNK_ELEMENTS if chunk_elements is None else max(1, chunk_elements)


def _row_blocks(n: int) -> list[slice]:
    count = max(1, math.ceil(n / _ROW_BLOCK))
    step = math.ceil(n / count)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def gram_matrix(x: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """G = X X^T and the squared row norms of X [n, D] (G's diagonal), in float64 on `device`."""
    n = x.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    accumulate_gram(gram, x)
    symmetrize_gram(gram)
    return gram, gram.diagonal().clone()


def accumulate_gram(gram: Tensor, x: Tensor, chunk_elements: int | None = None) -> None:
    """gram += X X^T for X [n, d], in place, lower block triangle (diagonal blocks included) only.

    Accumulated over feature chunks (each input element is converted to float64 once, one
    chunk of at most `chunk_elements` alive at a time), so the Gram of a wide layer can also be
    summed over column slices held at different times (the streaming profile). Call
    `symmetrize_gram` after the last slice.
    """
    n, dim = x.shape
    blocks = _row_blocks(n)
    cols = max(1, _chunk(chunk_elements) // max(n, 1))
    for f0 in range(0, dim, cols):
        chunk = x[:, f0 : f0 + cols].to(device=gram.device, dtype=torch.float64)
        for i, rows in enumerate(blocks):
            for other in blocks[: i + 1]:
                gram[rows, other].addmm_(chunk[rows], chunk[other].T)
        del chunk  # before the next one is made: one chunk alive at a time


def symmetrize_gram(gram: Tensor) -> None:
    """Copy the lower block triangle written by `accumulate_gram` onto the upper one."""
    blocks = _row_blocks(gram.shape[0])
    for i, rows in enumerate(blocks):
        for other in blocks[:i]:
            gram[other, rows] = gram[rows, other].T


def _sq_distance_bounds(
    gram: Tensor, sq: Tensor, r0: int, r1: int, start: int, end: int, gamma: float
) -> tuple[Tensor, Tensor]:
    """Bounds on the exact ||a - b||^2 for rows a in r0:r1 against all b, same class (start:end) = inf.

    d2 = sq_a + sq_b - 2 G_ab cancels when a and b are close relative to their norms; its
    rounding error is at most gamma * (sq_a + sq_b).
    """
    sq_sum = sq[r0:r1, None] + sq[None, :]
    d2 = torch.sub(sq_sum, gram[r0:r1], alpha=2.0)
    d2[:, start:end] = math.inf
    tol = sq_sum.mul_(gamma)
    lower = d2 - tol
    return lower, d2.add_(tol)


def _exact_min_sq_distance(x: Tensor, rows: Tensor, cols: Tensor, device: torch.device, chunk_elements: int | None = None) -> float:
    """min_i ||x[rows[i]] - x[cols[i]]||^2, computed directly in float64 (the two float64 row
    batches together hold at most `chunk_elements`; the difference is taken in place)."""
    if rows.numel() == 0:
        return math.nan
    per_batch = max(1, _chunk(chunk_elements) // (2 * max(x.shape[1], 1)))
    best = math.inf
    for i in range(0, rows.numel(), per_batch):
        a = x[rows[i : i + per_batch].to(x.device)].to(device=device, dtype=torch.float64)  # a gather: never x itself
        b = x[cols[i : i + per_batch].to(x.device)].to(device=device, dtype=torch.float64)
        best = min(best, float(a.sub_(b).square_().sum(1).min()))
        del a, b  # before the next batch is made
    return best


# Resolves the candidate pairs of the exact minimum-distance re-check: given, per class, the
# positions (rows, cols) of candidate pairs in the caller's row order, return per class
# min ||x_row - x_col||^2 computed directly in float64. In memory that indexes X; the streaming
# profile recomputes the few rows it needs with a teacher forward.
MinDistanceResolver = Callable[[list[tuple[Tensor, Tensor]]], list[float]]


def class_geometry(x: Tensor, y: Tensor, device: torch.device) -> dict[str, float]:
    """Class-averaged statistics 4 and 6 of subset A (METHOD 6.4, 6.5), float64.

    x: [n, D] flattened raw features; y: [n] labels. See `geometry_from_gram` for the values.
    """
    gram, sq = gram_matrix(x, device)

    def resolve(candidates: list[tuple[Tensor, Tensor]]) -> list[float]:
        return [_exact_min_sq_distance(x, rows, cols, device) for rows, cols in candidates]

    return geometry_from_gram(gram, sq, y, x.shape[1], resolve)


def geometry_from_gram(
    gram: Tensor, sq: Tensor, y: Tensor, dim: int, resolve: MinDistanceResolver, chunk_elements: int | None = None
) -> dict[str, float]:
    """Class-averaged statistics 4 and 6 of subset A from its Gram G = X X^T (METHOD 6.4, 6.5).

    gram [n, n] and sq [n] (squared row norms) in float64, on the device to compute on; y: [n]
    labels; dim: D, for the rounding bound; resolve: computes the exact minimum distance of the
    candidate pairs (see MinDistanceResolver); chunk_elements: bounds the float64 temporaries
    (four [rows, n] blocks of an eighth of it each). Returns AvgIntra, AvgInter, AvgMinIntra, AvgNorm,
    AvgMinInterDist: plain means over the classes k (and the C(C-1) ordered pairs for AvgInter)
    of the per-class values
      AvgIntraClassDPS_k   mean |cos| over the FULL class block, diagonal (= 1) included (12.4),
      MinIntraClassDPS_k   min |cos| over the same block,
      AvgInterClassDPS_kj  mean |cos| between classes k and j,
      AvgClassNorm_k       mean ||x_a||,
      MinInterClassDist_k  min ||x_a - x_b|| over a in class k, b in any other class.
    """
    device = gram.device
    n = gram.shape[0]
    y = y.detach().reshape(-1).to(device)
    classes, y_idx, counts = torch.unique(y, return_inverse=True, return_counts=True)
    num_classes = classes.numel()

    order = torch.argsort(y_idx, stable=True)  # classes become contiguous row ranges
    if bool((order != torch.arange(n, device=device)).any()):  # the streaming profile passes them sorted
        gram = gram[order[:, None], order[None, :]]
        sq = sq[order]
        y_idx = y_idx[order]
    norms = sq.sqrt()
    # first-order bound on the rounding error of sq_a + sq_b - 2 <a, b> (D-term float64 sums)
    gamma = 4.0 * (dim + 4) * _UNIT_ROUNDOFF

    block_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    min_intra = torch.empty(num_classes, dtype=torch.float64, device=device)
    avg_norm = torch.empty(num_classes, dtype=torch.float64, device=device)
    candidates: list[tuple[Tensor, Tensor]] = []
    chunk_rows = max(1, _chunk(chunk_elements) // (8 * n))  # bounds every [rows, n] temporary
    ends = torch.cumsum(counts, 0).tolist()
    for k, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
        chunks = [(r0, min(r0 + chunk_rows, end)) for r0 in range(start, end, chunk_rows)]
        lowest = torch.full((), math.inf, dtype=torch.float64, device=device)
        upper = lowest.clone()
        found = []
        for r0, r1 in chunks:
            diag = torch.arange(r1 - r0, device=device)
            cos = gram[r0:r1].abs().div_(norms[r0:r1, None]).div_(norms[None, :]).clamp_(max=1.0)  # in place: no n-wide temporaries
            cos[diag, r0 + diag] = 1.0  # c_aa = 1 exactly
            block_sums[k].index_add_(0, y_idx, cos.sum(0))
            lowest = torch.minimum(lowest, cos[:, start:end].amin())  # NaN propagates
            # the pair of the exact minimum has lower_d2 <= exact minimum <= every pair's upper_d2;
            # `upper` only decreases, so these hits are a superset of the final candidates
            lower_d2, upper_d2 = _sq_distance_bounds(gram, sq, r0, r1, start, end, gamma)
            upper = torch.minimum(upper, upper_d2.amin())
            hits = (lower_d2 <= upper).nonzero()
            found.append((lower_d2[hits[:, 0], hits[:, 1]], hits[:, 0] + r0, hits[:, 1]))
        min_intra[k] = lowest
        avg_norm[k] = norms[start:end].mean()

        lower, rows, cols = (torch.cat(parts) for parts in zip(*found))
        keep = lower <= upper
        lower, rows, cols = lower[keep], rows[keep], cols[keep]
        if lower.numel() > _MAX_CANDIDATES:
            keep = torch.topk(lower, _MAX_CANDIDATES, largest=False).indices
            rows, cols = rows[keep], cols[keep]
        candidates.append((order[rows], order[cols]))  # back to the caller's row order
    min_inter_dist = torch.tensor(resolve(candidates), dtype=torch.float64).sqrt()

    sizes = counts.to(torch.float64)
    block_means = (block_sums / (sizes[:, None] * sizes[None, :])).cpu()
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    return {
        "AvgIntra": float(block_means.diagonal().mean()),
        "AvgInter": float(block_means[off_diagonal].mean()),
        "AvgMinIntra": float(min_intra.mean().cpu()),
        "AvgNorm": float(avg_norm.mean().cpu()),
        "AvgMinInterDist": float(min_inter_dist.mean()),
    }


# --------------------------------------------------------------------------------------------
# Statistic 7 on subset B and the SVD entropy (METHOD 6.4, 6.5)


@contextlib.contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """One CPU thread for small LAPACK calls: their many OpenMP barriers make multi-threaded
    eigvalsh of a 500 x 500 matrix ~100x slower on a busy machine (measured: 0.02 s -> 4 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _centred_sq_singular_values(z: Tensor, device: torch.device, chunk_elements: int | None = None) -> Tensor:
    """Squared singular values of the column-centred z [n_k, D], descending, length min(n_k, D).

    Working memory: the float64 Gram (min(n_k, D)^2) and one float64 copy, centred in place: a
    chunk of at most `chunk_elements` when D >= n_k, else all of z (n_k * D < n_k^2)."""
    n_k, dim = z.shape
    if dim >= n_k:
        gram = torch.zeros(n_k, n_k, dtype=torch.float64, device=device)
        cols = max(1, _chunk(chunk_elements) // max(n_k, 1))
        for f0 in range(0, dim, cols):
            chunk = z[:, f0 : f0 + cols].to(device=device, dtype=torch.float64, copy=True)  # centred in place: never z
            chunk.sub_(chunk.mean(0))
            gram.addmm_(chunk, chunk.T)
            del chunk  # before the next one is made
    else:
        full = z.to(device=device, dtype=torch.float64, copy=True)
        full.sub_(full.mean(0))
        gram = full.T @ full
    if not bool(torch.isfinite(gram).all()):  # inf/NaN features: eigvalsh would fail to converge
        return torch.full((min(n_k, dim),), math.nan, dtype=torch.float64, device=gram.device)
    # eigenvalues of a PSD Gram; rounding can push (numerically) zero ones slightly negative
    with _single_threaded(gram.device):
        eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.flip(0).clamp_(min=0.0)


def class_spectra(x: Tensor, y: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Statistic 7 (METHOD 6.4): explained-variance ratios lambda_kj of each class of subset B.

    Returns (lam [C, n_max] float64 with n_max = max_k |B_k|, zero-padded past min(n_k, D);
    lengths [C] = min(n_k, D)). A class with zero total variance gives a NaN row, as in the
    reference.
    """
    y = y.detach().reshape(-1).to(x.device)
    classes, counts = torch.unique(y, return_counts=True)
    spectra = [class_spectrum(x[y == c], device) for c in classes]
    return explained_variance_rows(spectra, n_max=int(counts.max()))


def class_spectrum(z: Tensor, device: torch.device, chunk_elements: int | None = None) -> Tensor:
    """Squared singular values of one class's column-centred features z [n_k, ...] (statistic 7)."""
    return _centred_sq_singular_values(flatten_features(z), device, chunk_elements).cpu()


def explained_variance_rows(spectra: Sequence[Tensor], n_max: int) -> tuple[Tensor, Tensor]:
    """Per-class squared singular values -> (lam [C, n_max] zero-padded, lengths [C]) (METHOD 6.4).

    n_max is the largest class of subset B, max_k |B_k|, NOT the longest spectrum max_k min(n_k, D):
    on a layer narrower than B's classes (D < n_max) the columns past D are zero padding, so a
    truncation T > D reaches them and quirk 12.6 sets H_k = 0 (I = 0, Q = S), as the reference does.
    """
    lengths = torch.tensor([s2.numel() for s2 in spectra], dtype=torch.long)
    if int(lengths.max()) > n_max:
        raise ValueError(f"a spectrum of length {int(lengths.max())} exceeds n_max={n_max}; pass max_k |B_k|")
    lam = torch.zeros(len(spectra), n_max, dtype=torch.float64)
    for k, s2 in enumerate(spectra):
        lam[k, : s2.numel()] = s2 / s2.sum()
    return lam, lengths


def class_entropies(lam: Tensor, lengths: Tensor, threshold: float = VARIANCE_THRESHOLD) -> tuple[Tensor, int]:
    """Per-class SVD entropies H_k and the truncation T (METHOD 6.5, "Information2").

    k95_k = smallest t in 0..n_max-1 with sum_{j<=t} lambda_kj >= 0.95, capped at n_max - 1
            (the reference's while loop, so a NaN row stops at t = 1);
    T     = min(sum_k k95_k, n_max)     <- the SUM over classes, not the mean (quirk 12.5);
    p_kj  = lambda_kj / sum_{j<=T} lambda_kj;  H_k = -sum_{j<=T} p_kj ln p_kj;
    H_k   = 0 when the truncated row holds an exact zero, i.e. T > min(n_k, D) (quirk 12.6),
            and when it is NaN (the reference sets NaN entropies to 0).
    """
    num_classes, n_max = lam.shape
    prefix = torch.cat([lam.new_zeros(num_classes, 1), lam.cumsum(1)[:, : n_max - 1]], 1)
    stop = ~(prefix < threshold)
    stop[:, -1] = True
    k95 = stop.to(torch.int8).argmax(1)  # first True
    truncation = min(int(k95.sum()), n_max)
    head = lam[:, :truncation]
    p = head / head.sum(1, keepdim=True)
    entropy = -torch.special.xlogy(p, p).sum(1)
    entropy = torch.where(torch.isnan(entropy) | (lengths < truncation), 0.0, entropy)
    return entropy, truncation


# --------------------------------------------------------------------------------------------
# Formulas (METHOD 6.5)


def separation(avg_intra: float, avg_inter: float) -> float:
    """S = AvgIntra - AvgInter (METHOD 6.5)."""
    return avg_intra - avg_inter


def information(avg_min_intra: float, svde: float) -> float:
    """I = (1 - AvgMinIntra) * SVDE / ln 5 (METHOD 6.5; ln 5 is the reference's constant)."""
    return (1.0 - avg_min_intra) * svde / ENTROPY_NORMALISER


def efficiency_factor(n_train: int, pcagid: int) -> float:
    """K = (N_train / pi)^(1 / PCAGID), PCAGID = min(|A|, D) (METHOD 6.5, quirk 12.7)."""
    return (n_train / math.pi) ** (1.0 / pcagid)


def efficiency(avg_min_inter_dist: float, avg_norm: float, k_factor: float) -> float:
    """E = K * 2 * AvgMinInterDist / AvgNorm (METHOD 6.5); NaN (undefined) for an all-zero
    layer, whose AvgNorm is 0 (Python's 0 / 0 would raise and stop the whole profile)."""
    if avg_norm == 0.0:
        return math.nan
    return k_factor * 2.0 * avg_min_inter_dist / avg_norm


def knowledge_quality(s: float, i: float, e: float) -> float:
    """Q = S + sqrt(I * E) (METHOD 6.5, "Quality2")."""
    return s + math.sqrt(i * e)


# --------------------------------------------------------------------------------------------
# One layer (METHOD 6.6, steps 3-4)


def layer_stats(
    xa: Tensor,
    ya: Tensor,
    xb: Tensor,
    yb: Tensor,
    n_train: int,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """S, I, E, Q, sqrtIE of one layer and the intermediate statistics (METHOD 6.3-6.6).

    xa, xb: raw features [n, ...] of subsets A and B; ya, yb: their labels; n_train: the full
    training-set size (K uses it even when a smaller pool was analysed). `device`: where to
    compute (default: xa's device). Keys: S, I, E, Q, sqrtIE, AvgIntra, AvgInter, AvgMinIntra,
    AvgNorm, AvgMinInterDist, SVDE, T, PCAGID, K, D.
    """
    device = torch.device(device) if device is not None else xa.device
    for name, x, y in (("A", xa, ya), ("B", xb, yb)):
        if x.dim() < 2 or y.reshape(-1).numel() != x.shape[0]:
            raise DataError(
                f"subset {name}: features {tuple(x.shape)} and labels {tuple(y.shape)} do not match; "
                "pass [n, ...] features with n labels"
            )
    if xa.shape[1:] != xb.shape[1:]:
        raise DataError(f"subsets A and B hold different layers: {tuple(xa.shape[1:])} vs {tuple(xb.shape[1:])}")
    if torch.unique(ya).numel() < 2:
        raise DataError("subset A holds fewer than 2 classes; S and E need at least two")
    if n_train < 1:
        raise ConfigError(f"n_train must be the training-set size (>= 1), got {n_train}")

    flat_a = flatten_features(xa)
    geometry = class_geometry(flat_a, ya, device)
    lam, lengths = class_spectra(flatten_features(xb), yb, device)
    return statistics_to_quality(geometry, lam, lengths, n_a=flat_a.shape[0], dim=flat_a.shape[1], n_train=n_train)


def statistics_to_quality(
    geometry: Mapping[str, float], lam: Tensor, lengths: Tensor, *, n_a: int, dim: int, n_train: int
) -> dict[str, float]:
    """S, I, E, Q and sqrtIE (METHOD 6.5) from statistics 4 and 6 on subset A (`geometry`, as
    `geometry_from_gram` returns them) and statistic 7 on subset B (`lam`, `lengths`, as
    `explained_variance_rows` returns them). n_a = |A|; dim = flattened D; n_train for K."""
    entropy, truncation = class_entropies(lam, lengths)
    svde = float(entropy.mean())
    pcagid = min(n_a, dim)
    k_factor = efficiency_factor(n_train, pcagid)
    s = separation(geometry["AvgIntra"], geometry["AvgInter"])
    i = information(geometry["AvgMinIntra"], svde)
    e = efficiency(geometry["AvgMinInterDist"], geometry["AvgNorm"], k_factor)
    q = knowledge_quality(s, i, e)
    return {
        "S": s,
        "I": i,
        "E": e,
        "Q": q,
        "sqrtIE": math.sqrt(i * e),
        **geometry,
        "SVDE": svde,
        "T": truncation,
        "PCAGID": pcagid,
        "K": k_factor,
        "D": dim,
    }


def layer_quality(
    features: Tensor,
    labels: Tensor,
    n_train: int,
    *,
    subset_size: int = 5000,
    per_class_cap: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """S, I, E, Q of one layer from its features on a pool of training samples: the public entry
    point for features of your own.

    features: [n, ...] (any rank; 4-D maps above 262 144 values are max-pooled, METHOD 6.3);
    labels: [n] class indices; n_train: the full training-set size (K uses it). Draws the seeded
    class-balanced subsets A and B from the pool (`draw_subsets`, C = max label + 1 as the
    reference), then returns `layer_stats` on them: S, I, E, Q, sqrtIE and the intermediate
    statistics. Example: ``layer_quality(torch.relu(torch.randn(5000, 64)), labels, 50_000)``.
    """
    labels = labels.reshape(-1)
    num_classes = int(labels.max()) + 1
    subset_a, subset_b = draw_subsets(
        labels, num_classes, subset_size=subset_size, per_class_cap=per_class_cap, seed=seed
    )
    index_device = features.device
    return layer_stats(
        features[subset_a.to(index_device)],
        labels[subset_a.to(labels.device)],
        features[subset_b.to(index_device)],
        labels[subset_b.to(labels.device)],
        n_train,
        device=device,
    )


# --------------------------------------------------------------------------------------------
# Selection (METHOD section 0 item 4)


def select_layers(scores: Mapping[int, float], k: int, *, exclude_nan: bool = True) -> list[int]:
    """The k layers with the highest score, sorted by layer index; ties go to the lower index.

    NaN (undefined) and infinite scores are never selected: skipped when `exclude_nan`, else a
    DataError. An infinite score only comes from broken features, so it must not win.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1 layers, got {k}; set profile.k")
    values = {int(layer): float(score) for layer, score in scores.items()}
    nan_layers = sorted(layer for layer, score in values.items() if not math.isfinite(score))
    if nan_layers and not exclude_nan:
        raise DataError(
            f"layers {nan_layers} have a NaN or infinite score (a zero feature vector?); exclude them or fix the features"
        )
    valid = [(layer, score) for layer, score in values.items() if math.isfinite(score)]
    if k > len(valid):
        skipped = f" ({len(nan_layers)} NaN or infinite skipped)" if nan_layers else ""
        raise ConfigError(f"k={k} but only {len(valid)} layers have a score{skipped}; lower profile.k")
    ranked = sorted(valid, key=lambda item: (-item[1], item[0]))
    return sorted(layer for layer, _ in ranked[:k])
