"""The training images of an epoch, on the training device, without making the device wait.

Two ways, chosen once per run by `images_on_device`:

- resident: the training rows' uint8 images are copied to the device once and every batch is a
  gather there (CIFAR-100's 50 000 images are 150 MB). On the CPU this is the RAM copy itself:
  nothing is copied, so the batches, and with them the run's numbers, are today's.
- prefetch: past the budget, a background thread gathers the next batches on the host into
  (pinned, on CUDA) buffers and copies them to the device on a side stream, one or two batches
  ahead of the step that needs them.

The batch order is the loop's (`epoch_batches`); both ways hand the step exactly
`images[batch]`, so a run's metrics do not depend on which one was used (tests/test_inputs.py).

A streamed dataset (common/data/stream.py: the images stay in their files) has a third way,
`StreamedImages`: a DataLoader whose worker processes decode each batch and draw its training
augmentation (RandomResizedCrop + flip) per image, into pinned memory on CUDA.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from common.data.stream import FileImages, sample_seed
from common.errors import DataError

# Of the device memory free when the run starts: what resident images may take. Half leaves the
# model, optimizer, activations and the teacher's features room on any card the tool targets.
DEVICE_BUDGET_FRACTION = 0.5
PREFETCH_DEPTH = 2  # batches gathered ahead: one being copied while one waits for the step
MODES = ("auto", "resident", "prefetch")


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (torch.cuda.mem_get_info); the CPU has no separate pool."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def choose_mode(mode: str, nbytes: int, device: torch.device, fraction: float = DEVICE_BUDGET_FRACTION) -> str:
    """'resident' or 'prefetch' for `mode` ('auto' decides by the budget; on the CPU the images
    already live where the step reads them, so auto is resident there)."""
    if mode != "auto":
        return mode
    if device.type == "cpu":
        return "resident"
    return "resident" if nbytes <= fraction * free_device_bytes(device) else "prefetch"


class ResidentImages:
    """The training rows' images on the device; a batch is a gather of its rows there."""

    augments = False  # the loop draws the augmentation (common.data.registry.augment_batch)
    skipped = 0  # undecodable files replaced: only a streamed split has files

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, device: torch.device) -> None:
        if device.type == "cpu":
            # The device copy is the RAM copy: index the split itself, no second copy.
            self.images, self.position = images, None
        else:
            rows = rows.to(torch.long)
            self.images = images[rows].to(device)
            position = torch.full((images.shape[0],), -1, dtype=torch.long)
            position[rows] = torch.arange(rows.numel())
            self.position = position.to(device)
        self.device = device

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[torch.Tensor]:
        for idx in batches:
            if self.position is None:
                yield self.images[idx]
            else:
                yield self.images[self.position[idx.to(self.device, non_blocking=True)]]


class PrefetchedImages:
    """Batches gathered on the host by a background thread, PREFETCH_DEPTH ahead, copied to the
    device on a side stream (CUDA) from pinned buffers, so the copy overlaps the step."""

    augments = False
    skipped = 0

    def __init__(self, images: torch.Tensor, device: torch.device, depth: int = PREFETCH_DEPTH) -> None:
        self.images, self.device, self.depth = images, device, depth
        self.cuda = device.type == "cuda"

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        batch = self.images[idx]
        return batch.pin_memory() if self.cuda else batch

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[torch.Tensor]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def fill() -> None:
            try:
                for idx in batches:
                    if stop.is_set():
                        return
                    ready.put(self._gather(idx))
            except BaseException as exc:  # handed to the consumer, which raises it in the main thread
                ready.put(exc)
            ready.put(None)

        worker = threading.Thread(target=fill, name="kd-prefetch", daemon=True)
        worker.start()
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if stream is None:
                    yield item.to(self.device)
                    continue
                with torch.cuda.stream(stream):
                    on_device = item.to(self.device, non_blocking=True)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                on_device.record_stream(torch.cuda.current_stream(self.device))
                yield on_device
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)


class _Decoded(Dataset):
    """A streamed split as a map-style dataset whose keys are (position, augmentation seed or None)."""

    def __init__(self, images: FileImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor | None, int, str | None]:
        """(image, files replaced for it (bad_images=skip), None) or (None, 0, the DataError's
        line): an error travels back as data, since a DataLoader re-raises a worker's exception
        with the worker's traceback in its message, and the user gets one line naming the file."""
        before = len(self.images.skipped)
        try:
            image = self.images.load(*key)
        except DataError as exc:
            return None, 0, str(exc)
        return image, len(self.images.skipped) - before, None


class _EpochBatches:
    """The DataLoader's batch sampler: the loop's batches of the current epoch, set per epoch,
    so one loader (and its persistent workers) serves every epoch in the loop's order."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _stack(items: list[tuple[torch.Tensor | None, int, str | None]]) -> tuple[torch.Tensor | None, int, str | None]:
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return None, 0, errors[0]
    return torch.stack([image for image, _, _ in items]), sum(n for _, n, _ in items), None


class StreamedImages:
    """Batches of a streamed split decoded by DataLoader worker processes (persistent, pinned
    memory on CUDA), `workers` of them; with `augment`, each image's RandomResizedCrop + flip is
    drawn there from `sample_seed(seed, epoch, position)`, so the loop's own augmentation is
    skipped (`augments`) and a resumed epoch decodes the same crops as an uninterrupted one."""

    def __init__(self, images: FileImages, device: torch.device, augment: bool, seed: int, persistent: bool = True) -> None:
        self.device, self.augments, self.seed = device, augment, seed
        self.sampler = _EpochBatches()
        workers = images.workers if images.workers > 1 else 0  # 1: decode in this process
        self.loader = DataLoader(
            _Decoded(images), batch_sampler=self.sampler, num_workers=workers, collate_fn=_stack,
            pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
        )
        self.skipped = 0  # files replaced so far (bad_images=skip)

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[torch.Tensor]:
        def key(p: int) -> tuple[int, int | None]:
            return (p, sample_seed(self.seed, epoch, p) if self.augments else None)

        self.sampler.batches = [[key(p) for p in idx.tolist()] for idx in batches]
        for images, skipped, error in self.loader:
            if error is not None:
                raise DataError(error)
            self.skipped += skipped
            yield images.to(self.device, non_blocking=True)


ImageSource = ResidentImages | PrefetchedImages | StreamedImages


def eval_batches(images: torch.Tensor | FileImages, batches: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """`images[batch]` for each batch, in order, for evaluation: gathered from RAM, or for a
    streamed split decoded ahead by loader workers (evaluation transform), so the device does
    not wait for each batch's decode (ImageNet's 50 000 val images every epoch)."""
    if isinstance(images, FileImages):
        yield from StreamedImages(images, device, augment=False, seed=0, persistent=False).epoch(batches)
    else:
        yield from (images[batch] for batch in batches)


def images_on_device(
    images: torch.Tensor | FileImages, rows: torch.Tensor, device: torch.device, mode: str = "auto", *, augment: bool = False, seed: int = 0
) -> ImageSource:
    """The image source of a run: a streamed split's DataLoader; else resident when the rows fit
    DEVICE_BUDGET_FRACTION of the free device memory (or `mode` says so), else prefetched.
    `augment` and `seed` matter to a streamed split only (its workers draw the augmentation)."""
    if isinstance(images, FileImages):
        return StreamedImages(images, device, augment, seed)
    nbytes = int(rows.numel()) * images[0].numel() * images.element_size()
    if choose_mode(mode, nbytes, device) == "resident":
        return ResidentImages(images, rows, device)
    return PrefetchedImages(images, device)
