"""A run's training inputs on the training device, without making the device wait: the images here
(`images_on_device`), and the cached teacher features with the same machinery
(common/train/teacher_source.py's CachedTeacher).

Two ways, chosen once per run by `train.input_path` (auto | resident | prefetch):

- resident: the training rows are copied to the device once and every batch is a gather there
  (CIFAR-100's 50 000 uint8 images are 150 MB; the paper-layer feature cache 15.6 GB, the
  selected layers less). On the CPU this is the RAM copy itself: nothing is copied, so the
  batches, and with them the run's numbers, are today's.
- prefetch: past the budget, a background thread gathers the next batches on the host into
  (pinned, on CUDA) buffers and copies them to the device on a side stream, one or two batches
  ahead of the step that needs them (`Prefetcher`, generic over what a batch gathers).

One budget for both (`auto`): DEVICE_BUDGET_FRACTION of the device memory free when the run
sets up. The images are counted first (they are small and every run reads them); the features
get what the images leave (`features_mode`), or the whole budget when the images do not fit and
are prefetched. The features are placed first (the teacher source is built before the loop),
so when the loop then measures the free memory for the images, the features' bytes are already
gone from it and the images still fit whenever they were counted.

The batch order is the loop's (`epoch_batches`); both ways hand the step exactly the rows of
its batch, so a run's metrics do not depend on which one was used (tests/test_inputs.py). An
image source yields (the batch's indices on the device, its images): the indices are copied to
the device once per step, and the step's other users of them (CRD's memory bank, through
`Step`) take that copy.

A streamed dataset (common/data/stream.py: the images stay in their files) has a third way,
common/train/streamed.py's `StreamedImages`: a DataLoader whose worker processes decode each
batch and draw its training augmentation per image.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

import torch

from common.data.stream import FileImages
from common.train.streamed import StreamedImages

# Of the device memory free when the run starts: what resident images and features may take
# together. Half leaves the model, optimizer and activations room on any card the tool targets.
DEVICE_BUDGET_FRACTION = 0.5
PREFETCH_DEPTH = 2  # batches gathered ahead: one being copied while one waits for the step
MODES = ("auto", "resident", "prefetch")

# What one batch's gather gives: a tensor (the images) or tensors by name (the cached layers).
Rows = TypeVar("Rows", torch.Tensor, dict[str, torch.Tensor])


def free_device_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (torch.cuda.mem_get_info); the CPU has no separate pool."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def rows_nbytes(table: torch.Tensor, n_rows: int) -> int:
    """Bytes that `n_rows` rows of `table` take on the device."""
    return int(n_rows) * table[0].numel() * table.element_size()


def choose_mode(mode: str, nbytes: int, device: torch.device, fraction: float = DEVICE_BUDGET_FRACTION, reserved: int = 0) -> str:
    """'resident' or 'prefetch' for `mode` ('auto' decides by the budget less `reserved` bytes
    already promised; on the CPU the rows already live where the step reads them, so auto is
    resident there)."""
    if mode != "auto":
        return mode
    if device.type == "cpu":
        return "resident"
    return "resident" if nbytes <= fraction * free_device_bytes(device) - reserved else "prefetch"


def features_mode(mode: str, feature_bytes: int, image_bytes: int, device: torch.device, fraction: float = DEVICE_BUDGET_FRACTION) -> str:
    """The cached features' way for `mode`: resident when they fit what the run's images
    (`image_bytes`, counted first) leave of the one budget (module docstring)."""
    if mode != "auto" or device.type == "cpu":
        return choose_mode(mode, feature_bytes, device, fraction)
    budget = fraction * free_device_bytes(device)
    images = image_bytes if image_bytes <= budget else 0  # images that do not fit are prefetched: they hold nothing
    return "resident" if feature_bytes <= budget - images else "prefetch"


def position_map(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Where each of `n` keys is held among `rows` (a resident copy of those rows), -1 elsewhere."""
    position = torch.full((n,), -1, dtype=torch.long)
    position[rows.to(torch.long)] = torch.arange(rows.numel())
    return position


def _each(fn: Callable[[torch.Tensor], torch.Tensor], rows: Rows) -> Rows:
    return {name: fn(t) for name, t in rows.items()} if isinstance(rows, dict) else fn(rows)


def _tensors(rows: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(rows.values()) if isinstance(rows, dict) else [rows]


class ResidentImages:
    """The training rows' images on the device; a batch is a gather of its rows there."""

    augments = False  # the loop draws the augmentation (common.data.registry.augment_batch)
    skipped = 0  # undecodable files replaced: only a streamed split has files

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, device: torch.device) -> None:
        if device.type == "cpu":
            # The device copy is the RAM copy: index the split itself, no second copy.
            self.images, self.position = images, None
        else:
            self.images = images[rows.to(torch.long)].to(device)
            self.position = position_map(rows, images.shape[0]).to(device)
        self.device = device

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices on the device, images) of each batch; on the CPU the indices are `idx` itself."""
        for idx in batches:
            if self.position is None:
                yield idx, self.images[idx]
            else:
                on_device = idx.to(self.device, non_blocking=True)
                yield on_device, self.images[self.position[on_device]]


class Prefetcher(Generic[Rows]):
    """Batches gathered on the host by `gather(batch)` in a background thread, `depth` ahead,
    copied to the device on a side stream (CUDA) from pinned buffers, so the copy overlaps the
    step. `gather` may return one tensor or tensors by name; each is copied as it is."""

    def __init__(self, gather: Callable[[torch.Tensor], Rows], device: torch.device, depth: int = PREFETCH_DEPTH) -> None:
        self.gather, self.device, self.depth = gather, device, depth
        self.cuda = device.type == "cuda"

    def _host_rows(self, idx: torch.Tensor) -> Rows:
        rows = self.gather(idx)
        return _each(torch.Tensor.pin_memory, rows) if self.cuda else rows

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[Rows]:
        """The batches' rows on the device, in order (`epoch`: what sources that draw per epoch
        take, StreamedImages; nothing here depends on it)."""
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def fill() -> None:
            try:
                for idx in batches:
                    if stop.is_set():
                        return
                    ready.put(self._host_rows(idx))
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
                    yield _each(lambda t: t.to(self.device), item)
                    continue
                with torch.cuda.stream(stream):
                    on_device = _each(lambda t: t.to(self.device, non_blocking=True), item)
                step_stream = torch.cuda.current_stream(self.device)
                step_stream.wait_stream(stream)
                for tensor in _tensors(on_device):
                    tensor.record_stream(step_stream)  # its memory is reused only after the step used it
                yield on_device
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)


class PrefetchedImages(Prefetcher[torch.Tensor]):
    """The training images past the budget: `images[batch]` gathered ahead by a thread."""

    augments = False
    skipped = 0

    def __init__(self, images: torch.Tensor, device: torch.device, depth: int = PREFETCH_DEPTH) -> None:
        super().__init__(lambda idx: {"rows": idx, "images": images[idx]}, device, depth)
        self.images = images

    def epoch(self, batches: list[torch.Tensor], epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        """(indices on the device, images) of each batch, the indices copied with the images."""
        for batch in super().epoch(batches, epoch):
            yield batch["rows"], batch["images"]


ImageSource = ResidentImages | PrefetchedImages | StreamedImages


def images_on_device(
    images: torch.Tensor | FileImages, rows: torch.Tensor, device: torch.device, mode: str = "auto", *, augment: bool = False, seed: int = 0
) -> ImageSource:
    """The image source of a run: a streamed split's DataLoader; else resident when the rows fit
    DEVICE_BUDGET_FRACTION of the free device memory (or `mode` says so), else prefetched.
    `augment` and `seed` matter to a streamed split only (its workers draw the augmentation)."""
    if isinstance(images, FileImages):
        return StreamedImages(images, device, augment, seed)
    if choose_mode(mode, rows_nbytes(images, rows.numel()), device) == "resident":
        return ResidentImages(images, rows, device)
    return PrefetchedImages(images, device)
