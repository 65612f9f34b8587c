"""Datasets too large for RAM: images decoded from their files when a batch needs them.

`FileImages` stands where the in-RAM uint8 [N, C, H, W] tensor stands in a `Split`: indexing it
with positions decodes those files (a thread pool: PIL releases the GIL while decoding) and
returns the same kind of uint8 batch, so stage 1, evaluation and the exports read a streamed
dataset through the code that reads an in-RAM one. Training reads it through a
`torch.utils.data.DataLoader` with worker processes (`common.train.inputs.StreamedImages`),
which also draws the training augmentation there, per image.

What is held in memory is the file index (relative paths as fixed-width bytes, sizes, labels:
about 60 bytes an image, 75 MB for ImageNet's 1.28 M), never the pixels.

The transforms are ImageNet's standard ones (torchvision's reference recipe):

* evaluation (stage 1, test/val accuracy, a cache): the shorter side resized to `resize`
  (default round(size / 0.875): 256 for 224), then the centre `size` x `size` crop;
* training with `train.augment`: RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3) and a
  horizontal flip with p = 0.5, drawn from a generator seeded by (run seed, epoch, position), so
  a resumed epoch draws the same crops as an uninterrupted one whatever worker decodes them.

Resizing is bilinear with antialias, rounded to uint8: the in-RAM readers' `resize_images`, so a
square image goes through the streamed and the in-RAM path to the same pixels.

A file that cannot be decoded is an error naming it, or, with `dataset.bad_images=skip`, is
replaced by the next decodable image of the same class in the index (so labels and batch shapes
never change), warned about once per file (`FileImages.skipped`, one record per split) and
counted per split and epoch in the run's metrics.csv (`skipped_train`, `skipped_val`,
`skipped_test`). Images are decoded as PIL reads them: EXIF orientation is not applied, as in
torchvision's ImageFolder loader, so a photo stored sideways with an orientation tag is read sideways.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import DataError

log = logging.getLogger("kd")

# ImageNet statistics of the RGB channels in [0, 1]: what every torchvision (and timm's default)
# ImageNet classifier was trained with, so a streamed dataset normalises with them by default
# (dataset.mean_std=auto) and an ImageNet teacher sees its training distribution.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # eval: resize the shorter side to size / 0.875, centre-crop size (224 <- 256)
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction and aspect range (torchvision's)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10
BAD_IMAGES = ("error", "skip")


def default_resize(size: int) -> int:
    """The eval resize of the shorter side for a `size` crop: 256 for 224 (ImageNet's 0.875)."""
    return int(round(size / CROP_FRACTION))


def default_workers() -> int:
    """Decode workers: the cores this process may use, at most 8 (a loader past 8 rarely pays)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


# ----------------------------------------------------------------------------- transforms (pure)


def resize_shorter(image: torch.Tensor, short: int) -> torch.Tensor:
    """uint8 [C, H, W] with its shorter side scaled to `short`, aspect kept (bilinear, antialias)."""
    _, h, w = image.shape
    if min(h, w) == short:
        return image
    scale = short / min(h, w)
    size = (short, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), short)
    return _resize(image, size)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` x `size` of uint8 [C, H, W] (torchvision's rounding of the offsets)."""
    _, h, w = image.shape
    if h < size or w < size:  # only after a resize smaller than the crop: resize up first
        image = resize_shorter(image, size)
        _, h, w = image.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[:, top : top + size, left : left + size]


def eval_transform(image: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """Resize the shorter side to `resize`, then the centre `size` crop: [C, size, size] uint8."""
    return center_crop(resize_shorter(image, resize), size).contiguous()


def random_resized_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box: torchvision's algorithm (10 tries of an area
    fraction in RRC_SCALE and a log-uniform aspect in RRC_RATIO, else the centre crop of the
    clamped aspect), drawn from `generator` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(RRC_TRIES):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (RRC_SCALE[0] + u[0] * (RRC_SCALE[1] - RRC_SCALE[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip (p = 0.5), drawn from `generator`."""
    top, left, h, w = random_resized_box(image.shape[1], image.shape[2], generator)
    out = _resize(image[:, top : top + h, left : left + w], (size, size))
    if float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def sample_seeds(run_seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """The augmentation seeds of images `positions` in one epoch (int64, non-negative): a function
    of (seed, epoch, position) only, so no worker, batch split or resume changes what an image's
    crop is. splitmix64 of position + a per-(seed, epoch) offset: vectorised (a batch at a time,
    where a hash per image cost ImageNet's epoch seconds) and well mixed in every bit."""
    offset = int.from_bytes(hashlib.blake2b(f"{run_seed}:{epoch}".encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 wants
        z = np.asarray(positions, dtype=np.uint64) + np.uint64(offset)
        z = (z + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


def sample_seed(run_seed: int, epoch: int, position: int) -> int:
    """`sample_seeds` of one image."""
    return int(sample_seeds(run_seed, epoch, np.array([position]))[0])


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[1:]) == size:
        return image
    x = F.interpolate(image.unsqueeze(0).to(torch.float32), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_rgb(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] of one image file (grayscale, CMYK and palettes converted to RGB).

    `Image.load` inside the try: a truncated JPEG fails there (PIL's default refuses truncated
    files), not later as a silently grey bottom half."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: cannot decode image ({exc}); set dataset.bad_images=skip (the file is replaced by the next image of its class "
            f"and counted; finished work is kept and the run resumes), or remove or replace the file (a changed dataset: its artifacts are made anew)"
        ) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- the file index


@dataclass(frozen=True)
class FileIndex:
    """Image files of one split: paths relative to `root` (fixed-width bytes: one array, no
    Python object per image, so worker processes share it without copy-on-write growth), their
    sizes in bytes and labels."""

    root: Path
    paths: np.ndarray  # dtype S<n>
    sizes: np.ndarray  # int64 bytes
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, position: int) -> Path:
        return self.root / self.paths[position].decode()

    def digest(self) -> bytes:
        """What identifies the split's content for cache keys: names, sizes and labels, not bytes."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.paths).tobytes())
        h.update(self.sizes.astype(np.int64).tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.digest()


def index_files(root: Path, files: Sequence[Path], labels: Sequence[int]) -> FileIndex:
    """A FileIndex of `files` (all under `root`) with their labels; sizes from one stat each."""
    rel = [str(p.relative_to(root)).encode() for p in files]
    paths = np.array(rel, dtype=f"S{max(1, max((len(r) for r in rel), default=1))}")
    sizes = np.array([p.stat().st_size for p in files], dtype=np.int64)
    return FileIndex(root, paths, sizes, torch.tensor(list(labels), dtype=torch.int64))


# ----------------------------------------------------------------------------- FileImages


class FileImages:
    """uint8 images decoded from files on demand, indexed like the in-RAM [N, C, H, W] tensor.

    `images[positions]` (a tensor, list, slice or int) decodes those files with the evaluation
    transform; `take(positions)` is a view of fewer files (nothing decoded); `load(position,
    seed)` is one image for training (the train transform when `seed` is given).
    """

    dtype = torch.uint8

    def __init__(self, index: FileIndex, size: int, resize: int, workers: int, bad_images: str = "error", skipped: set[str] | None = None) -> None:
        if bad_images not in BAD_IMAGES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGES}")
        self.index, self.size, self.resize, self.workers, self.bad_images = index, size, resize, workers, bad_images
        # files replaced so far (bad_images=skip) in this process, one record per split: its views
        # (`take`: the validation rows, a subset) share it, so each file is warned about once
        self.skipped: set[str] = skipped if skipped is not None else set()
        self._pool: ThreadPoolExecutor | None = None

    # -- what the in-RAM tensor answers
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.index)

    def dim(self) -> int:
        return 4

    def element_size(self) -> int:
        return 1

    def __getitem__(self, key: int | slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(key, int):
            return self.load(key)
        positions = self._positions(key)
        if len(positions) <= 1 or self.workers <= 1:
            images = [self.load(p) for p in positions]
        else:
            images = list(self._threads().map(self.load, positions))
        if not images:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        return torch.stack(images)

    def take(self, key: slice | torch.Tensor | Sequence[int]) -> "FileImages":
        """The files at `key`, as FileImages (same transforms); nothing is decoded."""
        positions = np.asarray(self._positions(key), dtype=np.int64)
        sub = FileIndex(self.index.root, self.index.paths[positions], self.index.sizes[positions], self.index.labels[torch.from_numpy(positions)])
        return FileImages(sub, self.size, self.resize, self.workers, self.bad_images, self.skipped)

    # -- decoding
    def load(self, position: int, seed: int | None = None) -> torch.Tensor:
        """Image `position` at size x size: the eval transform, or the train one seeded by `seed`."""
        image, replaced = self.load_reporting(position, seed)
        self.note_skipped(replaced)
        return image

    def load_reporting(self, position: int, seed: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """`load` without the record: the image and the files replaced for it (bad_images=skip),
        for a loader worker, whose copy's record the main process never sees."""
        image, replaced = self._decode(int(position))
        if seed is None:
            return eval_transform(image, self.size, self.resize), replaced
        return train_transform(image, self.size, torch.Generator().manual_seed(seed)), replaced

    def note_skipped(self, files: Sequence[str]) -> None:
        """Record replaced files in the split's record, with one warning per file per process."""
        for bad in files:
            if bad not in self.skipped:
                self.skipped.add(bad)
                log.warning("data: skipped %s (cannot decode it; dataset.bad_images=skip), using the next image of its class", bad)

    def _decode(self, position: int) -> tuple[torch.Tensor, list[str]]:
        try:
            return decode_rgb(self.index.path(position)), []
        except DataError:
            if self.bad_images == "error":
                raise
        return self._substitute(position)

    def _substitute(self, position: int) -> tuple[torch.Tensor, list[str]]:
        """The next decodable image of the same class after `position` (wrapping), and the files
        passed over on the way (`position`'s first): bad_images=skip."""
        replaced = [str(self.index.path(position))]
        labels = self.index.labels
        same = torch.nonzero(labels == labels[position]).flatten().tolist()
        start = same.index(position)
        for other in same[start + 1 :] + same[:start]:
            try:
                return decode_rgb(self.index.path(other)), replaced
            except DataError:
                replaced.append(str(self.index.path(other)))
        raise DataError(f"{replaced[0]}: no image of its class (label {int(labels[position])}) under {self.index.root} can be decoded; replace the files")

    def _positions(self, key: slice | torch.Tensor | Sequence[int]) -> list[int]:
        if isinstance(key, slice):
            return list(range(len(self)))[key]
        if isinstance(key, torch.Tensor):
            if key.dtype == torch.bool:
                key = torch.nonzero(key).flatten()
            return key.reshape(-1).tolist()
        return [int(k) for k in key]

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kd-decode")
        return self._pool

    # -- pickling for DataLoader workers: no thread pool, no per-process skip record
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "skipped": set()}

    def fingerprint_parts(self) -> bytes:
        """The split's identity for artifact keys: the file index and the transform settings.

        Not `bad_images`: it decides only whether a run that meets an undecodable file stops or
        replaces it, and an artifact finished under `error` met none, so under `skip` it would
        read the same images. Switching to `skip` after the error therefore finds the finished
        teacher, profile and cache, and resumes the interrupted run; what a run replaced is in
        its metrics.csv (skipped_*). Hashed as "error", the value every earlier key was made with.
        """
        return self.index.digest() + repr((self.size, self.resize, "error")).encode()


def select(images: torch.Tensor | FileImages, positions: torch.Tensor) -> torch.Tensor | FileImages:
    """`images` at `positions`, without decoding a streamed split (a view of its files)."""
    return images.take(positions) if isinstance(images, FileImages) else images[positions]


def is_streamed(images: object) -> bool:
    return isinstance(images, FileImages)
