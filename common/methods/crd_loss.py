"""Contrastive Representation Distillation (Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020), as implemented in HobbitLong/RepDistiller `crd/` (criterion.py,
memory.py) and `dataset/cifar100.py` (`CIFAR100InstanceSample`).

The student's and the teacher's penultimate features (the pooled vector before the classifier,
RepDistiller's `feat[-1]`, mdistiller's "pooled_feat") are embedded into a common unit sphere by
one linear map each (`Embed`). Each side is contrasted against a memory bank of the *other*
side's embeddings of the whole training set (`ContrastMemory`, one row per dataset index): the
row of the sample itself is the positive, K rows of other samples are negatives. The critic's
score for a pair is exp(<e, m> / T) / Z, with Z a normalisation constant estimated once, and the
loss is the NCE objective with the uniform noise distribution P_n = 1 / N (`nce_loss`). After
the scores, the positive rows of both banks move towards the batch's embeddings with momentum
and are renormalised.

The two terms of `CRDLoss`, in RepDistiller's words: (a) the student as anchor, positive and
negatives from the teacher memory; (b) the teacher as anchor, positive and negatives from the
student memory. The embeddings (both) are trained; the teacher's features are detached.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.errors import ConfigError

# ----------------------------------------------------------------------------- defaults
# RepDistiller train_student.py option defaults (commit 7fd6eff) and the CRD commands of its
# README / scripts/run_cifar_distill.sh; mdistiller's CFG.CRD (engine/cfg.py) agrees on all.
CRD_FEAT_DIM = 128  # --feat_dim 128 (CFG.CRD.FEAT.DIM)
CRD_N_NEGATIVES = 16384  # --nce_k 16384 (CFG.CRD.NCE.K)
CRD_NCE_T = 0.07  # --nce_t 0.07 (CFG.CRD.NCE.TEMPERATURE)
CRD_MOMENTUM = 0.5  # --nce_m 0.5 (CFG.CRD.NCE.MOMENTUM)
CRD_MODE = "exact"  # --mode exact: the positive is the sample itself (CFG.CRD.MODE)
NCE_EPS = 1e-7  # crd/criterion.py `eps`
# Loss weights: total = gamma * CE + alpha * KD + beta * CRD (RepDistiller helper/loops.py).
CRD_CE_WEIGHT = 1.0  # -r/--gamma default 1 (CFG.CRD.LOSS.CE_WEIGHT 1.0)
CRD_WEIGHT = 0.8  # -b 0.8 in both CRD commands (CFG.CRD.LOSS.FEAT_WEIGHT 0.8)
# "CRD" (the row of the CRD paper's Tables 1-2 / RepDistiller README, and of
# ../shared/reference/cifar100_kd_published.csv): -a 0, no KD. mdistiller's CRD has no KD either.
CRD_KD_WEIGHT = 0.0
# "CRD+KD": -a 1 with RepDistiller's DistillKL at --kd_T 4, which includes the T^2 factor.
# common.methods.losses.kd_loss has no T^2, so this is a weight of CRD_PLUS_KD_KD_WEIGHT * T^2 = 16 there.
CRD_PLUS_KD_KD_WEIGHT = 1.0
CRD_KD_T = 4.0  # --kd_T 4


def _positive(name: str, value: float, hint: str) -> None:
    if not value > 0:
        raise ConfigError(f"CRD {name} must be > 0, got {value}; {hint}")


# ----------------------------------------------------------------------------- embedding


class Embed(nn.Module):
    """e = W f + b, then e / ||e||_2 (RepDistiller crd/criterion.py `Embed` + `Normalize(2)`).

    Input (B, ...) is flattened to (B, dim_in). Divides by the plain norm, as the reference
    (no epsilon: an all-zero embedding is a NaN, not a silent zero).
    """

    def __init__(self, dim_in: int, feat_dim: int = CRD_FEAT_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.linear(x.reshape(x.shape[0], -1))
        return e / e.pow(2).sum(dim=1, keepdim=True).sqrt()


# ----------------------------------------------------------------------------- negatives


class NegativeSampler(nn.Module):
    """contrast_idx (B, 1 + n_negatives) for a batch of bank positions: column 0 the positive,
    then n_negatives positions. Mode "exact" (RepDistiller's default): the positive is the
    sample's own position `idx`.

    - `labels` given (the class of every bank row, (N,)): each row's negatives come from the rows
      of *other* classes, without replacement unless n_negatives exceeds that pool (RepDistiller
      `CIFAR100InstanceSample.__getitem__`: np.random.choice(cls_negative[target], k,
      replace=k > len(cls_negative[target]))).
    - `labels` None: uniform over all `n_data` positions with replacement, the positive included
      (RepDistiller `ContrastMemory.forward` with idx=None: AliasMethod over uniform unigrams).

    A draw reads nothing back to the host (issue 19: a host read per step drains a GPU's queue):
    what depends on the labels alone (class counts, which classes need replacement) is found here,
    once, on the host. Without replacement, a row keeps the n_negatives smallest of N uniform keys
    with its own class's keys pushed past 1 (a uniform random subset of the other classes' rows,
    the trick torch.multinomial uses); with replacement, n_negatives uniform picks from that pool
    (the rows sorted by class: the pool of class c is that order with c's block cut out). The
    reference draws per sample in the dataset's __getitem__; here per batch, the same law.

    Its tensors are non-persistent buffers: they move with the module and stay out of checkpoints.
    `idx` must lie in [0, N): CRDTerm.check_rows checks a run's rows once, on the host.
    """

    def __init__(self, labels: torch.Tensor | None, n_negatives: int, *, n_data: int | None = None) -> None:
        super().__init__()
        if n_negatives < 1:
            raise ConfigError(
                f"CRD needs at least 1 negative per sample, got n_negatives={n_negatives}; "
                f"use {CRD_N_NEGATIVES} (RepDistiller --nce_k)"
            )
        if labels is not None:
            labels = labels.reshape(-1).long().cpu()
            if n_data is not None and n_data != labels.numel():
                raise ValueError(f"n_data={n_data} but {labels.numel()} labels")
            n_data = labels.numel()
        if n_data is None:
            raise ValueError("NegativeSampler needs labels or n_data")
        self.n_negatives, self.n_data = int(n_negatives), int(n_data)
        self.by_class = labels is not None
        # which draws a batch may need: decided on the host from the labels, never per batch
        self.without_replacement = self.with_replacement = False
        if labels is not None:
            counts = torch.bincount(labels)
            present = (counts > 0).nonzero().squeeze(1)
            if present.numel() < 2:
                raise ConfigError(
                    f"CRD draws negatives from other classes, but every training sample has class {int(present[0])}; "
                    "use a dataset with at least two classes"
                )
            pool = self.n_data - counts  # rows of other classes, per class
            replace = self.n_negatives > pool
            self.without_replacement = bool((~replace[present]).any())
            self.with_replacement = bool(replace[present].any())
            self.register_buffer("labels", labels, persistent=False)
            self.register_buffer("pool", pool, persistent=False)
            self.register_buffer("replace", replace, persistent=False)
            self.register_buffer("by_label", torch.argsort(labels, stable=True), persistent=False)  # rows sorted by class
            self.register_buffer("start", torch.cumsum(counts, 0) - counts, persistent=False)  # each class's block there
            self.register_buffer("count", counts, persistent=False)

    def forward(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = idx.reshape(-1).long()
        batch, k, device = idx.numel(), self.n_negatives, idx.device
        if not self.by_class:
            negatives = torch.randint(self.n_data, (batch, k), generator=generator, device=device)
            return torch.cat([idx[:, None], negatives], dim=1)
        anchor = self.labels[idx]  # (B,) each row's class
        negatives = None
        if self.without_replacement:
            keys = torch.rand(batch, self.n_data, generator=generator, device=device)
            keys.masked_fill_(self.labels[None, :] == anchor[:, None], 2.0)  # never among the k smallest: k <= the pool
            negatives = keys.topk(k, dim=1, largest=False).indices
        if self.with_replacement:
            # j uniform in [0, pool of the row's class); past its class's block it skips that block
            pool = self.pool[anchor][:, None]
            # min(): float32 rounding can carry rand * pool up to pool itself
            j = torch.minimum((torch.rand(batch, k, generator=generator, device=device) * pool).long(), pool - 1)
            start, count = self.start[anchor][:, None], self.count[anchor][:, None]
            replaced = self.by_label[j + count * (j >= start)]
            negatives = replaced if negatives is None else torch.where(self.replace[anchor][:, None], replaced, negatives)
        return torch.cat([idx[:, None], negatives], dim=1)


def sample_negatives(
    idx: torch.Tensor,
    labels: torch.Tensor | None,
    n_negatives: int,
    generator: torch.Generator | None = None,
    *,
    n_data: int | None = None,
) -> torch.Tensor:
    """One batch's contrast_idx from a NegativeSampler built for it (see there). A training run
    builds its sampler once (CRDTerm); this is for one-off draws."""
    sampler = NegativeSampler(labels, n_negatives, n_data=n_data).to(idx.device)
    return sampler(idx, generator)


# ----------------------------------------------------------------------------- NCE loss


def nce_loss(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss of a score matrix x (B, 1 + m): column 0 positive, m negatives per row.

    With P_n = 1 / n_data (uniform noise) and eps = 1e-7 (RepDistiller `ContrastLoss`,
    "corresponding to Eq (18)" of the paper in its docstring):

        L = -( sum_b log( x_b0 / (x_b0 + m P_n + eps) )
             + sum_b sum_{k>=1} log( m P_n / (x_bk + m P_n + eps) ) ) / B

    i.e. minus the log-likelihood of the classifier h = P / (P + m P_n) that tells the positive
    from noise, summed over the row (not averaged over its m + 1 entries), averaged over rows.
    """
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"scores must be (B, 1 + m) with m >= 1, got {tuple(x.shape)}")
    m = x.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + NCE_EPS))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


# ----------------------------------------------------------------------------- memory


class ContrastMemory(nn.Module):
    """Two memory banks of embeddings, one row per training sample (RepDistiller crd/memory.py).

    Buffers (so a checkpoint holds them and a resumed run goes on with the same banks and Z):
    - `memory_student`, `memory_teacher` (n_data, feat_dim): RepDistiller's memory_v1 (updated
      with the student's embeddings) and memory_v2 (the teacher's), initialised uniform in
      [-stdv, stdv], stdv = 1 / sqrt(feat_dim / 3), so a row's expected squared norm is 1;
    - `z` (2,): the normalisation constants [Z_s, Z_t], -1 until the first batch sets them to
      mean(exp(scores / T)) * n_data over that batch's (B, 1 + K) scores, then fixed.

    `forward(e_s, e_t, idx, contrast_idx)` returns (out_s, out_t), each (B, 1 + K):
    out_s[b, k] = exp(<memory_teacher[contrast_idx[b, k]], e_s[b]> / T) / Z_s (student anchor)
    and out_t likewise with memory_student and e_t; then both banks' rows `idx` are updated:
    row <- normalise(momentum * row + (1 - momentum) * e). Scores use the banks before the update.

    The scores are computed as one (B, n_data) product, then gathered: the same numbers as the
    reference's gather-then-bmm, without materialising B * (1 + K) * feat_dim memory rows
    (537 MB per side at the CIFAR defaults). Always in float32 or wider: exp(1 / 0.07) = 1.6e6
    overflows float16.
    """

    def __init__(
        self,
        feat_dim: int,
        n_data: int,
        n_negatives: int = CRD_N_NEGATIVES,
        T: float = CRD_NCE_T,
        momentum: float = CRD_MOMENTUM,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if feat_dim < 1 or n_data < 2:
            raise ConfigError(
                f"CRD memory needs feat_dim >= 1 and at least 2 training samples, got feat_dim={feat_dim}, n_data={n_data}"
            )
        if n_negatives < 1:
            raise ConfigError(
                f"CRD needs at least 1 negative per sample, got n_negatives={n_negatives}; "
                f"use {CRD_N_NEGATIVES} (RepDistiller --nce_k)"
            )
        _positive("temperature", T, f"use {CRD_NCE_T} (RepDistiller --nce_t)")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(
                f"CRD memory momentum must be in [0, 1), got {momentum}; use {CRD_MOMENTUM} (RepDistiller --nce_m)"
            )
        self.feat_dim, self.n_data, self.n_negatives = int(feat_dim), int(n_data), int(n_negatives)
        self.T, self.momentum = float(T), float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(n_data, feat_dim, generator=generator).mul_(2 * stdv).sub_(stdv)
            self.register_buffer(name, bank)
        self.register_buffer("z", torch.full((2,), -1.0))

    def _scores(self, anchor: torch.Tensor, bank: torch.Tensor, contrast_idx: torch.Tensor) -> torch.Tensor:
        # A snapshot of the bank: the update below writes it in place, and autograd keeps the
        # operand of the product for the anchor's gradient.
        dots = anchor @ bank.detach().clone().T
        return torch.exp(dots.gather(1, contrast_idx) / self.T)

    def forward(
        self, e_s: torch.Tensor, e_t: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = e_s.shape[0]
        if e_s.shape != (batch, self.feat_dim) or e_t.shape != e_s.shape:
            raise ValueError(f"embeddings must be (B, {self.feat_dim}), got {tuple(e_s.shape)} and {tuple(e_t.shape)}")
        if contrast_idx.shape != (batch, 1 + self.n_negatives):
            raise ValueError(
                f"contrast_idx must be (B, 1 + n_negatives) = ({batch}, {1 + self.n_negatives}), got {tuple(contrast_idx.shape)}"
            )
        idx, contrast_idx = idx.reshape(-1).long(), contrast_idx.long()
        dtype = self.memory_student.dtype
        with torch.autocast(device_type=e_s.device.type, enabled=False):
            e_s, e_t = e_s.to(dtype), e_t.to(dtype)
            out_s = self._scores(e_s, self.memory_teacher, contrast_idx)
            out_t = self._scores(e_t, self.memory_student, contrast_idx)
            with torch.no_grad():
                # set once, at the first batch: where(), not `if z < 0`, which is a host read per step
                first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            out_s, out_t = out_s / self.z[0], out_t / self.z[1]
            self.update(e_s, e_t, idx)
        return out_s, out_t

    @torch.no_grad()
    def update(self, e_s: torch.Tensor, e_t: torch.Tensor, idx: torch.Tensor) -> None:
        """row <- (momentum * row + (1 - momentum) * e) / ||...||_2 for the rows `idx` of both banks."""
        for bank, e in ((self.memory_student, e_s), (self.memory_teacher, e_t)):
            rows = bank.index_select(0, idx).mul_(self.momentum).add_(e.detach().to(bank.dtype), alpha=1 - self.momentum)
            rows.div_(rows.pow(2).sum(dim=1, keepdim=True).sqrt())
            bank.index_copy_(0, idx, rows)


# ----------------------------------------------------------------------------- the loss


class CRDLoss(nn.Module):
    """CRD = NCE(out_s) + NCE(out_t) over the embedded penultimate features (RepDistiller `CRDLoss`).

    `forward(f_s, f_t, idx, contrast_idx=None, generator=None)`: f_s (B, s_dim) student
    features, f_t (B, t_dim) teacher features (detached here), idx (B,) the batch's dataset
    indices, contrast_idx (B, 1 + n_negatives) from `sample_negatives` (the positive first). Without
    contrast_idx the negatives are drawn uniformly over all n_data with `generator`.

    The returned loss is unweighted: the method adds CRD_WEIGHT * it to CRD_CE_WEIGHT * CE
    (and CRD_PLUS_KD_KD_WEIGHT * KD for "CRD+KD").
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int = CRD_FEAT_DIM,
        n_negatives: int = CRD_N_NEGATIVES,
        T: float = CRD_NCE_T,
        momentum: float = CRD_MOMENTUM,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_data = int(n_data)
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.memory = ContrastMemory(feat_dim, n_data, n_negatives, T, momentum, generator=generator)

    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        idx: torch.Tensor,
        contrast_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if contrast_idx is None:
            contrast_idx = sample_negatives(idx, None, self.memory.n_negatives, generator, n_data=self.n_data)
        e_s = self.embed_s(f_s)
        e_t = self.embed_t(f_t.detach())
        out_s, out_t = self.memory(e_s, e_t, idx, contrast_idx)
        return nce_loss(out_s, self.n_data) + nce_loss(out_t, self.n_data)
