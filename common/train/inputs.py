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
Each yields (the batch's rows on the device, its images): the rows are copied to the device once
per step, and the step's other users of them (CRD's memory bank, through `Step`) take that copy.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch

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

    def epoch(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows on the device, images) of each batch; on the CPU the rows are `idx` itself."""
        for idx in batches:
            if self.position is None:
                yield idx, self.images[idx]
            else:
                on_device = idx.to(self.device, non_blocking=True)
                yield on_device, self.images[self.position[on_device]]


class PrefetchedImages:
    """Batches gathered on the host by a background thread, PREFETCH_DEPTH ahead, copied to the
    device on a side stream (CUDA) from pinned buffers, so the copy overlaps the step."""

    def __init__(self, images: torch.Tensor, device: torch.device, depth: int = PREFETCH_DEPTH) -> None:
        self.images, self.device, self.depth = images, device, depth
        self.cuda = device.type == "cuda"

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.images[idx]
        return (idx.pin_memory(), batch.pin_memory()) if self.cuda else (idx, batch)

    def epoch(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows on the device, images) of each batch, the rows copied with the images."""
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
                    yield tuple(t.to(self.device) for t in item)
                    continue
                with torch.cuda.stream(stream):
                    on_device = tuple(t.to(self.device, non_blocking=True) for t in item)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                for t in on_device:
                    t.record_stream(torch.cuda.current_stream(self.device))
                yield on_device
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)


def images_on_device(images: torch.Tensor, rows: torch.Tensor, device: torch.device, mode: str = "auto") -> ResidentImages | PrefetchedImages:
    """The image source of a run: resident when the rows fit DEVICE_BUDGET_FRACTION of the free
    device memory (or `mode` says so), else prefetched."""
    nbytes = int(rows.numel()) * images[0].numel() * images.element_size()
    if choose_mode(mode, nbytes, device) == "resident":
        return ResidentImages(images, rows, device)
    return PrefetchedImages(images, device)
