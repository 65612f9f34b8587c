"""Teacher knowledge per training batch, for the training loop (common/train/loop.py's TeacherSource).

From the HDF5 feature cache (`CachedTeacher`, the default: no teacher forward during training)
or from a live eval-mode forward on the same, possibly augmented, batch (`LiveTeacher`, needed
with augmentation because cached features would be stale).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from common.cache.reader import FeatureCache, epoch_batches, layer_name, widen_rows
from common.train import inputs
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


class ResidentFeatures:
    """The cached layers of a run's rows on the device, in their stored dtype (float16 halves the
    memory); a batch is a gather there, widened to float32 as `FeatureCache.gather` gives it."""

    block_bytes = 64 << 20  # per copy to the device while it is filled (from RAM or the file)

    def __init__(self, cache: FeatureCache, names: list[str], rows: torch.Tensor, device: torch.device) -> None:
        """rows: the file rows to hold (sorted, unique), as `FeatureCache.rows_of` gives them."""
        self.device = device
        self.position = inputs.position_map(rows, cache.n)  # on the host: rows are checked there, once per epoch
        self.tables: dict[str, torch.Tensor] = {}
        for name in names:
            per_row = max(1, cache.nbytes(name) // max(1, cache.n))
            start = 0
            for block in rows.split(max(1, self.block_bytes // per_row)):
                part = cache.gather_rows(name, block, widen=False)
                if name not in self.tables:
                    self.tables[name] = torch.empty((rows.numel(), *part.shape[1:]), dtype=part.dtype, device=device)
                self.tables[name][start : start + len(block)].copy_(part)
                start += len(block)

    def indices(self, rows: torch.Tensor) -> torch.Tensor:
        """Device indices of file `rows` (host), copied in one go (an epoch's rows at once).

        IndexError for a row not held (read on the host, once per call: a wrong index would be
        a device-side assert on a GPU)."""
        index = self.position[rows]
        if index.numel() and int(index.min()) < 0:
            raise IndexError("asked the device-resident teacher features for rows of no training position of this run")
        return index.to(self.device, non_blocking=True)

    def gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: widen_rows(table.index_select(0, index)) for name, table in self.tables.items()}


def _copies_to_device(device: torch.device) -> bool:
    """Whether resident features need their own device copy: not on the CPU, where the RAM copy
    (or the file) is where the step reads, so today's gather is the resident path there."""
    return device.type != "cpu"


class CachedTeacher:
    """Teacher features/logits gathered from the feature cache by sample index (no teacher forward).

    Where the rows live follows `train.input_path` and one device budget with the images
    (common/train/inputs.py): resident on the device (`ResidentFeatures`; on the CPU the RAM copy
    or the file, read in the step as before), or gathered ahead by a thread into pinned buffers
    and copied on a side stream (`Prefetcher`). Every way hands the step the same numbers.
    """

    block_size = 4096  # rows per contiguous disk block
    # The batch order must not depend on this machine's free memory (a run is fixed by its seed
    # and config): training rows larger than this are always batched in shuffled contiguous
    # blocks, smaller ones always at random, whether they are read from RAM or from disk.
    block_order_bytes = 16 << 30

    def __init__(
        self, cache: FeatureCache, layers: list[int], logits: bool, device: torch.device, max_ram_bytes: int, rows: torch.Tensor | None = None,
        input_path: str = "auto", image_bytes: int = 0,
    ) -> None:
        """input_path: train.input_path; image_bytes: what the run's images take of the device
        budget (`inputs.features_mode` counts them first)."""
        self.cache, self.layers, self.logits, self.device = cache, layers, logits, device
        self.names = names = [layer_name(i) for i in layers] + (["logits"] if logits else [])
        self._epoch_rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        # In RAM (only the training rows) when they fit, else read from disk; either way every
        # dataset is checked against its checksum before training starts (`load` checks what it
        # reads). Where the rows live never changes the batch order (`block_order`).
        self.from_disk = not cache.load(names, max_ram_bytes, rows=rows)
        if self.from_disk:
            cache.verify(names)
        run_rows = torch.arange(cache.n) if rows is None else torch.unique(cache.rows_of(rows))
        row_bytes = sum(cache.nbytes(n) // max(1, cache.n) for n in names)
        self.block_order = row_bytes * run_rows.numel() > self.block_order_bytes
        self.mode = inputs.features_mode(input_path, row_bytes * run_rows.numel(), image_bytes, device)
        self._resident = ResidentFeatures(cache, names, run_rows, device) if self.mode == "resident" and _copies_to_device(device) else None
        self._prefetch = inputs.Prefetcher(self._stored_rows, device) if self.mode == "prefetch" else None
        self._ahead: Iterator[dict[str, torch.Tensor]] | None = None  # this epoch's prefetched batches
        self._next: list[torch.Tensor] = []  # the epoch's batches not yet handed out, in order

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Random batches; for a cache too large for random reads from disk, shuffled blocks of
        contiguous file rows (each batch reads one or two regions)."""
        if not self.block_order:
            batches = epoch_batches(indices, batch_size, generator)
        else:
            batches = epoch_batches(indices, batch_size, generator, block_size=self.block_size, file_rows=self.cache.rows_of(indices))
        self._epoch_rows = self._check_rows(batches)
        if self._prefetch is not None:
            self._stop_prefetch()
            self._ahead = self._prefetch.epoch([self._epoch_rows[id(b)][1] for b in batches])
            self._next = list(reversed(batches))  # popped from the end: the next batch is last
        return batches

    def _check_rows(self, batches: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The file rows of every batch of an epoch, checked once for the whole epoch (a missing
        row is a CacheError before its first step), keyed by the batch tensor's identity, with
        their device indices when the rows are resident there (copied once for the epoch).

        The check reads a value on the host (`absent.any()`): once per batch and layer it was a
        host sync inside every step (issue 19), now it is one per epoch. The batch tensor is
        kept beside its rows, so an id is never matched by another tensor that reuses it.
        """
        if not batches:
            return {}
        rows = self.cache.rows_of(torch.cat(batches))
        self.cache.check_loaded(rows, self.names)
        sizes = [len(b) for b in batches]
        on_device = self._resident.indices(rows).split(sizes) if self._resident is not None else [None] * len(batches)
        return {id(b): (b, r, d) for b, r, d in zip(batches, rows.split(sizes), on_device)}

    def _stored_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch's rows of every cached name in the stored dtype (the prefetch thread's gather)."""
        return {name: self.cache.gather_rows(name, rows, widen=False) for name in self.names}

    def _stop_prefetch(self) -> None:
        if self._ahead is not None:
            self._ahead.close()  # stops its thread (an epoch left early: a NaN stop, a test)
        self._ahead, self._next = None, []

    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        known = self._epoch_rows.get(id(indices))
        if known is not None and known[0] is indices:
            _, rows, on_device = known
        else:  # a batch of no `batch_order` (a test, a benchmark): checked here
            rows, on_device = self.cache.rows_of(indices), None
            self.cache.check_loaded(rows, self.names)
        if self._resident is not None:
            got = self._resident.gather(on_device if on_device is not None else self._resident.indices(rows))
        elif self._ahead is not None and self._next and self._next[-1] is indices:
            self._next.pop()
            got = {name: widen_rows(t) for name, t in next(self._ahead).items()}
        else:  # read in the step: the CPU's resident path, and any batch out of the epoch's order
            got = {name: self.cache.gather_rows(name, rows).to(self.device, non_blocking=True) for name in self.names}
        feats = {i: got[layer_name(i)] for i in self.layers}
        return feats, got["logits"] if self.logits else None
