"""A streamed split's batches (common/data/stream.py): decoded from files by DataLoader workers.

The third input path beside common/train/inputs.py's resident and prefetched ones: a dataset too
large for RAM is decoded per batch by `dataset.workers` worker processes (persistent across
epochs, pinned memory on CUDA), which also draw the training augmentation per image from a seed
of (run seed, epoch, position), so which worker decodes an image, and a resume, change nothing.
Evaluation decodes ahead the same way (`eval_batches`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from common.data.stream import FileImages, sample_seeds
from common.errors import DataError


class _Decoded(Dataset):
    """A streamed split as a map-style dataset whose keys are (position, augmentation seed or None)."""

    def __init__(self, images: FileImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor | None, tuple[str, ...], str | None]:
        """(image, files replaced for it (bad_images=skip), None) or (None, (), the DataError's
        line): an error travels back as data, since a DataLoader re-raises a worker's exception
        with the worker's traceback in its message, and the user gets one line naming the file.
        The replaced files go back every time (a worker's record is its own), so the main
        process counts them per epoch and warns once per file."""
        try:
            image, replaced = self.images.load_reporting(*key)
        except DataError as exc:
            return None, (), str(exc)
        return image, tuple(replaced), None


class _EpochBatches:
    """The DataLoader's batch sampler: the loop's batches of the current epoch, set per epoch,
    so one loader (and its persistent workers) serves every epoch in the loop's order.

    A batch's keys (position, augmentation seed) are made when the loader asks for that batch,
    vectorised: made up front for the whole epoch they took 133 bytes an image (160 MB for
    ImageNet) and delayed the first batch by seconds (bench/bench_stream.py's finding)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.seeds: tuple[int, int] | None = None  # (run seed, epoch) when the workers augment

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        for idx in self.batches:
            positions = idx.numpy()
            seeds = sample_seeds(*self.seeds, positions).tolist() if self.seeds is not None else [None] * len(positions)
            yield list(zip(positions.tolist(), seeds))

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list[tuple[torch.Tensor | None, tuple[str, ...], str | None]]) -> tuple[torch.Tensor | None, tuple[str, ...], str | None]:
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return None, (), errors[0]
    return torch.stack([image for image, _, _ in items]), tuple(f for _, files, _ in items for f in files), None


class StreamedImages:
    """Batches of a streamed split decoded by DataLoader worker processes (persistent, pinned
    memory on CUDA), `workers` of them; with `augment`, each image's RandomResizedCrop + flip is
    drawn there from `sample_seeds(seed, epoch, positions)`, so the loop's own augmentation is
    skipped (`augments`) and a resumed epoch decodes the same crops as an uninterrupted one."""

    def __init__(self, images: FileImages, device: torch.device, augment: bool, seed: int, persistent: bool = True) -> None:
        self.device, self.augments, self.seed = device, augment, seed
        self.sampler = _EpochBatches()
        workers = images.workers if images.workers > 1 else 0  # 1: decode in this process
        self.loader = DataLoader(
            _Decoded(images), batch_sampler=self.sampler, num_workers=workers, collate_fn=_stack,
            pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
        )
        self.images = images
        self.replaced: set[str] = set()  # files replaced (bad_images=skip) in the last `epoch` pass

    @property
    def skipped(self) -> int:
        """Distinct files replaced in the last pass (the loop's per-epoch count)."""
        return len(self.replaced)

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices on the device, images) of each batch, decoded in the loop's order."""

        self.sampler.batches = batches
        self.sampler.seeds = (self.seed, epoch) if self.augments else None
        self.replaced = set()
        for idx, (images, replaced, error) in zip(batches, self.loader):
            if error is not None:
                raise DataError(error)
            if replaced:
                self.replaced.update(replaced)
                self.images.note_skipped(replaced)  # the split's record: one warning per file
            yield idx.to(self.device, non_blocking=True), images.to(self.device, non_blocking=True)



def eval_batches(
    images: torch.Tensor | FileImages, batches: list[torch.Tensor], device: torch.device, replaced: set[str] | None = None
) -> Iterator[torch.Tensor]:
    """`images[batch]` for each batch, in order, for evaluation: gathered from RAM, or for a
    streamed split decoded ahead by loader workers (evaluation transform), so the device does
    not wait for each batch's decode (ImageNet's 50 000 val images every epoch). The files
    replaced on the way (bad_images=skip) are added to `replaced`."""
    if isinstance(images, FileImages):
        source = StreamedImages(images, device, augment=False, seed=0, persistent=False)
        for _, batch in source.epoch(batches):
            if replaced is not None:  # before the yield: a consumer may stop after the last batch
                replaced.update(source.replaced)
            yield batch
    else:
        yield from (images[batch] for batch in batches)
