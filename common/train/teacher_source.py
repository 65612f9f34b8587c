"""Teacher knowledge per training batch, for the training loop (common/train/loop.py's TeacherSource).

From the HDF5 feature cache (`CachedTeacher`, the default: no teacher forward during training)
or from a live eval-mode forward on the same, possibly augmented, batch (`LiveTeacher`, needed
with augmentation because cached features would be stale).
"""
from __future__ import annotations

import torch
from torch import nn

from common.cache.reader import FeatureCache, epoch_batches, layer_name
from common.layers.hooks import extract, forward_with_features


class LiveTeacher:
    """Teacher features/logits from an eval-mode forward on the (augmented) batch."""

    def __init__(self, teacher: nn.Module, layers: list[int], logits: bool) -> None:
        self.teacher, self.layers, self.logits = teacher.eval(), layers, logits

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        return epoch_batches(indices, batch_size, generator)

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        if self.logits:
            logits, feats = forward_with_features(self.teacher, images, self.layers)
            return {k: v.float() for k, v in feats.items()}, logits.float()
        feats = extract(self.teacher, images, self.layers) if self.layers else {}
        return {k: v.float() for k, v in feats.items()}, None


class CachedTeacher:
    """Teacher features/logits gathered from the feature cache by sample index (no teacher forward)."""

    block_size = 4096  # rows per contiguous disk block
    # The batch order must not depend on this machine's free memory (a run is fixed by its seed
    # and config): training rows larger than this are always batched in shuffled contiguous
    # blocks, smaller ones always at random, whether they are read from RAM or from disk.
    block_order_bytes = 16 << 30

    def __init__(
        self, cache: FeatureCache, layers: list[int], logits: bool, device: torch.device, max_ram_bytes: int, rows: torch.Tensor | None = None
    ) -> None:
        self.cache, self.layers, self.logits, self.device = cache, layers, logits, device
        self.names = names = [layer_name(i) for i in layers] + (["logits"] if logits else [])
        self._epoch_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # In RAM (only the training rows) when they fit, else read from disk; either way every
        # dataset is checked against its checksum before training starts (`load` checks what it
        # reads). Where the rows live never changes the batch order (`block_order`).
        self.from_disk = not cache.load(names, max_ram_bytes, rows=rows)
        if self.from_disk:
            cache.verify(names)
        n_rows = cache.n if rows is None else int(torch.unique(rows).numel())
        self.block_order = sum(cache.nbytes(n) // max(1, cache.n) for n in names) * n_rows > self.block_order_bytes

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Random batches; for a cache too large for random reads from disk, shuffled blocks of
        contiguous file rows (each batch reads one or two regions)."""
        if not self.block_order:
            batches = epoch_batches(indices, batch_size, generator)
        else:
            batches = epoch_batches(indices, batch_size, generator, block_size=self.block_size, file_rows=self.cache.rows_of(indices))
        self._epoch_rows = self._check_rows(batches)
        return batches

    def _check_rows(self, batches: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The file rows of every batch of an epoch, checked once for the whole epoch (a missing
        row is a CacheError before its first step), keyed by the batch tensor's identity.

        The check reads a value on the host (`absent.any()`): once per batch and layer it was a
        host sync inside every step (issue 19), now it is one per epoch. The batch tensor is
        kept beside its rows, so an id is never matched by another tensor that reuses it.
        """
        if not batches:
            return {}
        rows = self.cache.rows_of(torch.cat(batches))
        self.cache.check_loaded(rows, self.names)
        return {id(b): (b, r) for b, r in zip(batches, rows.split([len(b) for b in batches]))}

    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        known = self._epoch_rows.get(id(indices))
        if known is not None and known[0] is indices:
            rows = known[1]
        else:  # a batch of no `batch_order` (a test, a benchmark): checked here
            rows = self.cache.rows_of(indices)
            self.cache.check_loaded(rows, self.names)
        feats = {i: self.cache.gather_rows(layer_name(i), rows).to(self.device, non_blocking=True) for i in self.layers}
        logits = self.cache.gather_rows("logits", rows).to(self.device, non_blocking=True) if self.logits else None
        return feats, logits
