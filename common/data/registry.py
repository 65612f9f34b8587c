"""Dataset registry: images held in RAM as uint8, MeanVar normalisation, seeded splits (METHOD 2).

Registered datasets (all read from local files under `dataset.root`; the readers of each file
format live in `common/data/formats.py`):

* `fashion_mnist` - IDX .gz files; 1 x 28 x 28, 10 classes.
* `cifar10`, `cifar100` - torchvision's python-pickle layout; CIFAR-100 uses the fine labels.
* `tiny_imagenet` - the standard `tiny-imagenet-200/` folder; its `val/` split is the test split.
* `image_folder` - `<root>/train/<class>/*` and `<root>/test/<class>/*` (or `val/`); streamed
  from its files when it is too large for RAM (`dataset.stream`).
* `imagenet` - ILSVRC-2012 in class folders, `<root>/train/<wnid>/*.JPEG` and
  `<root>/val/<wnid>/*.JPEG` (val/ as the common val-prep step leaves it); always streamed, with
  ImageNet's transforms and normalisation (common/data/stream.py).

`load_data(cfg)` returns a `Data`: the full training split in its original order (the feature
cache is indexed by these positions), the test split, the training-set mean/std, and a seeded
class-balanced train/validation partition of the training positions (METHOD section 0 item 8).
Pixels stay uint8 until `Data.normalize` turns a batch into float32 on the target device. A
streamed split holds a `FileImages` (the file index) where an in-RAM one holds the tensor.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common.config import DatasetConfig
from common.data.formats import (
    CIFAR10, CIFAR100, TINY_SIZE, Loaded, Split, cifar_downloader, cifar_loader, class_folder_files, download_fashion_mnist,
    load_fashion_mnist, load_image_folder, load_tiny_imagenet, resize_images,
)
from common.data.stream import IMAGENET_MEAN, IMAGENET_STD, FileImages, decode_rgb, default_resize, default_workers, index_files
from common.errors import ConfigError, DataError
from common.registry import Registry

STD_EPS = 1e-8  # added to the std (METHOD 2.2)
PAD = 4  # random-crop padding (METHOD 2.3)
STREAM_SIZE = 224  # a streamed dataset's crop when dataset.image_size is unset (ImageNet's)
# dataset.stream=auto streams an image_folder whose decoded uint8 images would take more than
# this. A fixed size, not a share of this machine's free memory: whether a dataset streams
# changes its preprocessing (resize + centre crop), so it must not depend on the machine.
# Tiny ImageNet's 110 000 images at 64 px are 1.35 GB; ImageNet's at 224 px 193 GB.
STREAM_ABOVE_BYTES = 8 << 30


# ----------------------------------------------------------------------------- containers


@dataclass
class Data:
    """A loaded dataset. `train` is the FULL training split in file order; `train_indices` and
    `val_indices` partition its positions."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]
    train: Split
    test: Split
    mean: torch.Tensor  # [C] float32, pixels in [0, 1] (METHOD 2.2)
    std: torch.Tensor  # [C] float32, unbiased, + 1e-8
    train_indices: torch.Tensor  # int64 positions in `train` used for training
    val_indices: torch.Tensor  # int64 positions in `train` held out for validation (may be empty)
    fingerprint: str  # "dataset + preprocessing" part of cache keys
    _affine: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def streamed(self) -> bool:
        """Whether the images stay in their files (common/data/stream.py), decoded per batch."""
        return isinstance(self.train.images, FileImages)

    def normalize(self, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std on `device` (METHOD 2.2).

        The uint8 batch is moved first: a quarter of the bytes of a float32 copy.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"normalize expects a uint8 batch, got {images.dtype}")
        x = images.to(device) if device is not None else images
        scale, shift = self._scale_shift(x.device)
        return x.to(torch.float32).mul_(scale).sub_(shift)

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # (x/255 - m)/s == x * (1/(255 s)) - m/s, precomputed in float64 once per device
        key = str(device)
        if key not in self._affine:
            mean, std = self.mean.double(), self.std.double()
            scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1).to(device)
            shift = (mean / std).float().view(1, -1, 1, 1).to(device)
            self._affine[key] = (scale, shift)
        return self._affine[key]

    def training_subset(self, n: int | None, seed: int, key: str = "train.train_subset") -> torch.Tensor:
        """Seeded class-balanced subset of `train_indices`: floor(n / C) per class, so
        floor(n / C) * C positions, sorted. None = all of `train_indices`. `key` is the setting
        `n` came from, which an impossible `n`'s error names.

        Subsets with the same seed are nested: a smaller n picks a prefix of each class's draw.
        """
        if n is None:
            return self.train_indices.clone()
        per_class = n // self.num_classes
        counts = class_counts(self.train.labels, self.num_classes, self.train_indices)
        if per_class < 1 or per_class > int(counts.min()):
            raise ConfigError(
                f"{key}={n} asks for {per_class} images per class, impossible for {self.name}: its training split has "
                f"{int(counts.min())} in its smallest class of {self.num_classes}; set {key} between {self.num_classes} and "
                f"{int(counts.min()) * self.num_classes}, or leave it empty for the whole training split"
            )
        return balanced_subset(self.train.labels, per_class, seed, pool=self.train_indices)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. `load(root, image_size)` reads the files under `root` (a reader of
    common/data/formats.py); readers of images with mixed sizes resize per image, the others
    leave resizing to `load_data`."""

    name: str
    load: Callable[[Path, int | None], Loaded]
    num_classes: int | None  # None: discovered from the files
    in_channels: int | None
    native_size: int | None
    default_root: str | None  # None: dataset.root is required
    download: Callable[[Path], None] | None = None  # fetch into root (needs network)
    description: str = ""
    # streamed datasets: root -> ({"train": files, "test": files}, labels, class names)
    files: Callable[[Path], tuple[dict[str, list[Path]], dict[str, list[int]], list[str]]] | None = None
    always_stream: bool = False


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ----------------------------------------------------------------------------- public functions


def load_data(cfg: DatasetConfig) -> Data:
    """Load `cfg.name` from `cfg.root` (or its default root), resize to `cfg.image_size` if set,
    compute MeanVar statistics (METHOD 2.2) and the seeded validation split."""
    spec = DATASETS.get(cfg.name)
    root_text = cfg.root if cfg.root is not None else spec.default_root
    if root_text is None:
        raise ConfigError(f"{spec.name}: no default location; pass dataset.root=DIR")
    root = Path(root_text).expanduser()
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"dataset.image_size={cfg.image_size} must be a positive number of pixels (or empty)")
    if cfg.download:
        if spec.download is None:
            raise ConfigError(f"{spec.name} cannot be downloaded by this tool; set dataset.download=false and place the files under dataset.root")
        spec.download(root)
    if not root.is_dir():
        raise DataError(f"{spec.name}: dataset root {root} not found; pass dataset.root=DIR holding the {spec.name} files")

    listing = _streamed_listing(spec, cfg, root)
    if listing is not None:
        return _load_streamed(spec, cfg, root, listing)
    loaded = spec.load(root, cfg.image_size)
    train, test = loaded.train, loaded.test
    num_classes = len(loaded.class_names)
    if num_classes < 2:  # nothing to classify, and S/I/E/Q compare classes (METHOD 6)
        raise DataError(f"{spec.name}: only {num_classes} class ({', '.join(loaded.class_names)}) under {root}; a classification dataset needs at least 2 classes")
    _check_split(spec.name, "train", train, num_classes)
    _check_split(spec.name, "test", test, num_classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{spec.name}: train images are {tuple(train.images.shape[1:])} but test images are {tuple(test.images.shape[1:])} under {root}; both splits must share a shape")
    if cfg.image_size is not None:
        train = Split(resize_images(train.images, cfg.image_size), train.labels)
        test = Split(resize_images(test.images, cfg.image_size), test.labels)
    height, width = train.images.shape[2:]
    if height != width:
        raise DataError(f"{spec.name}: images under {root} are {width}x{height}, not square; set dataset.image_size=N to resize them")

    mean, std = _imagenet_stats() if cfg.mean_std == "imagenet" else channel_stats(train.images)
    train_indices, val_indices = validation_split(train.labels, num_classes, cfg.val_size, cfg.split_seed)
    return Data(
        name=spec.name,
        num_classes=num_classes,
        in_channels=int(train.images.shape[1]),
        image_size=int(height),
        class_names=list(loaded.class_names),
        train=train,
        test=test,
        mean=mean,
        std=std,
        train_indices=train_indices,
        val_indices=val_indices,
        fingerprint=fingerprint(spec.name, train, test, mean, std),
    )


Listing = tuple[dict[str, list[Path]], dict[str, list[int]], list[str]]


def _streamed_listing(spec: DatasetSpec, cfg: DatasetConfig, root: Path) -> Listing | None:
    """The files of each split when `cfg` streams `spec` (dataset.stream; auto decides by the
    decoded size), None when the dataset is read into RAM."""
    if spec.files is None:
        if cfg.stream is True:
            raise ConfigError(f"dataset.stream=true: {spec.name} is read into RAM only (its files are not one image each); set dataset.stream=auto")
        return None
    if spec.always_stream:
        if cfg.stream is False:
            raise ConfigError(f"dataset.stream=false: {spec.name} is always streamed; for a small copy in RAM use dataset.name=image_folder with the same root")
        return spec.files(root)
    if cfg.stream is False:
        return None
    listing = spec.files(root)
    if cfg.stream is True:
        return listing
    paths = listing[0]
    n = len(paths["train"]) + len(paths["test"])
    side = cfg.image_size if cfg.image_size is not None else max(decode_rgb(paths["train"][0]).shape[1:])
    return listing if n * 3 * side * side > STREAM_ABOVE_BYTES else None


def _load_streamed(spec: DatasetSpec, cfg: DatasetConfig, root: Path, listing: Listing) -> Data:
    """A Data whose splits are FileImages: the file index in RAM, the pixels decoded per batch."""
    if cfg.mean_std == "dataset":
        raise ConfigError(
            f"dataset.mean_std=dataset: {spec.name} is streamed, so its pixel statistics would take a pass over every file; "
            "set dataset.mean_std=imagenet (or auto), or dataset.stream=false for a dataset that fits in RAM"
        )
    paths, labels, classes = listing
    if len(classes) < 2:
        raise DataError(f"{spec.name}: only {len(classes)} class ({', '.join(classes)}) under {root}; a classification dataset needs at least 2 classes")
    size = cfg.image_size if cfg.image_size is not None else STREAM_SIZE
    resize = cfg.resize if cfg.resize is not None else default_resize(size)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    splits = {
        which: Split(FileImages(index_files(root, paths[which], labels[which]), size, resize, workers, cfg.bad_images), torch.tensor(labels[which], dtype=torch.int64))
        for which in ("train", "test")
    }
    for which, split in splits.items():
        _check_split(spec.name, which, split, len(classes))
    mean, std = _imagenet_stats()
    train_indices, val_indices = validation_split(splits["train"].labels, len(classes), cfg.val_size, cfg.split_seed)
    return Data(
        name=spec.name,
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        class_names=list(classes),
        train=splits["train"],
        test=splits["test"],
        mean=mean,
        std=std,
        train_indices=train_indices,
        val_indices=val_indices,
        fingerprint=streamed_fingerprint(spec.name, splits["train"], splits["test"], mean, std),
    )


def _imagenet_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std (dataset.mean_std=imagenet; streamed datasets by default)."""
    return torch.tensor(IMAGENET_MEAN, dtype=torch.float32), torch.tensor(IMAGENET_STD, dtype=torch.float32)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std (+1e-8) of uint8 images scaled to [0, 1] (METHOD 2.2).

    Exact: computed from a 256-bin histogram per channel in float64 (about 0.5 s for CIFAR's
    150 M training pixels on 2 CPU cores), so no statistics cache is needed.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean)
        stds.append(var.sqrt() + STD_EPS)
    return torch.stack(means).float(), torch.stack(stds).float()


def class_counts(labels: torch.Tensor, num_classes: int, pool: torch.Tensor | None = None) -> torch.Tensor:
    """Images per class among `labels[pool]` (all labels when pool is None), int64 [C]."""
    chosen = labels if pool is None else labels[pool]
    return torch.bincount(chosen, minlength=num_classes)


def balanced_subset(
    labels: torch.Tensor, per_class: int, seed: int, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """`per_class` seeded random positions of each class, sorted (METHOD section 0 item 2).

    Positions index `labels`; they are drawn from `pool` (all positions when None). Every class
    present in `labels` must have `per_class` members in the pool. Same seed -> same draw, and
    draws are nested in `per_class`.
    """
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return _draw_per_class(labels, torch.full((num_classes,), per_class, dtype=torch.int64), seed, pool)


def validation_split(
    labels: torch.Tensor, num_classes: int, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, val_indices): `val_size` positions held out, class-balanced and seeded
    (METHOD section 0 item 8). Each class gives floor(val_size / C) images; the remainder goes
    one each to seeded random classes, so exactly `val_size` are held out."""
    everything = torch.arange(labels.shape[0], dtype=torch.int64)
    if val_size < 0:
        raise ConfigError(f"dataset.val_size={val_size} must be 0 or more")
    if val_size == 0:
        return everything, torch.zeros(0, dtype=torch.int64)
    counts = class_counts(labels, num_classes)
    wanted = torch.full((num_classes,), val_size // num_classes, dtype=torch.int64)
    extra = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[: val_size % num_classes]
    wanted[extra] += 1
    if bool((wanted >= counts).any()):
        raise ConfigError(
            f"dataset.val_size={val_size} is impossible: each class must keep training images and the "
            f"smallest class has {int(counts.min())}; set dataset.val_size between 0 and {(int(counts.min()) - 1) * num_classes}"
        )
    val = _draw_per_class(labels, wanted, seed, None)
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[val] = False
    return everything[keep], val


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding 4 in normalised space) + horizontal flip p = 0.5.

    METHOD 2.3 describes the reference's per-batch version; this is the standard per-sample one
    (torchvision's RandomCrop(pad 4) then RandomHorizontalFlip, drawn for each image). One gather
    does both: each output pixel reads its shifted, maybe mirrored, source pixel from the
    zero-padded batch. Random numbers come from `generator`, on the generator's own device.
    """
    batch, channels, height, width = x.shape
    gdev = generator.device
    dy = torch.randint(0, 2 * PAD + 1, (batch,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * PAD + 1, (batch,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(batch, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = dy[:, None] + torch.arange(height, device=x.device)  # [B, H]
    cols_out = torch.arange(width, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], width - 1 - cols_out, cols_out)  # [B, W]
    flat = (rows[:, :, None] * (width + 2 * PAD) + cols[:, None, :]).view(batch, 1, -1)
    picked = padded.view(batch, channels, -1).gather(2, flat.expand(batch, channels, -1))
    return picked.view(batch, channels, height, width)


def fingerprint(name: str, train: Split, test: Split, mean: torch.Tensor, std: torch.Tensor, samples: int = 1 << 20) -> str:
    """Short hash of the dataset and its preprocessing: name, split sizes, all labels, a strided
    sample of image bytes, image shape and mean/std. Part of every feature-cache key."""
    h = hashlib.sha256()
    h.update(name.encode())
    for split in (train, test):
        h.update(repr((len(split), tuple(split.images.shape[1:]))).encode())
        h.update(split.labels.numpy().tobytes())
        flat = split.images.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step].numpy().tobytes())
    h.update(mean.numpy().tobytes())
    h.update(std.numpy().tobytes())
    return h.hexdigest()[:16]


def streamed_fingerprint(name: str, train: Split, test: Split, mean: torch.Tensor, std: torch.Tensor) -> str:
    """`fingerprint` of a streamed dataset: from its file index (names, sizes, labels) and its
    transforms, not from image bytes, which are never all read."""
    h = hashlib.sha256()
    h.update(f"{name}:streamed".encode())
    for split in (train, test):
        assert isinstance(split.images, FileImages)
        h.update(split.images.fingerprint_parts())
    h.update(mean.numpy().tobytes())
    h.update(std.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- helpers


def _draw_per_class(labels: torch.Tensor, wanted: torch.Tensor, seed: int, pool: torch.Tensor | None) -> torch.Tensor:
    """`wanted[c]` seeded random positions of class c from `pool`, sorted.

    Shuffle the pool once, stable-sort it by label, and take the first `wanted[c]` of each class
    block: vectorised, and nested in `wanted` for a fixed seed.
    """
    pool = torch.arange(labels.shape[0], dtype=torch.int64) if pool is None else pool.to(torch.int64)
    num_classes = wanted.shape[0]
    counts = class_counts(labels, num_classes, pool)[:num_classes]
    short = torch.nonzero(counts < wanted).flatten()
    if short.numel():
        c = int(short[0])
        raise DataError(f"class {c} has {int(counts[c])} images in the pool but {int(wanted[c])} were requested; ask for at most {int(counts.min())} per class")
    shuffled = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))]
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(wanted.max()) if num_classes else 0)
    take = (starts[:, None] + offsets[None, :])[offsets[None, :] < wanted[:, None]]
    return torch.sort(by_class[take]).values


def _no_ram_copy(root: Path, image_size: int | None) -> Loaded:
    raise AssertionError("imagenet is always streamed (DatasetSpec.always_stream)")


def _check_split(name: str, which: str, split: Split, num_classes: int) -> None:
    if split.images.dtype != torch.uint8 or split.images.dim() != 4:
        raise DataError(f"{name}: {which} images must be uint8 [N, C, H, W], got {split.images.dtype} {tuple(split.images.shape)}")
    if split.images.shape[0] != split.labels.shape[0]:
        raise DataError(f"{name}: {which} split has {split.images.shape[0]} images but {split.labels.shape[0]} labels")
    if len(split) == 0:
        raise DataError(f"{name}: {which} split is empty; each split needs images under dataset.root (check the files there)")
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{name}: {which} labels span {low}..{high} but there are {num_classes} classes")


# ----------------------------------------------------------------------------- registry

DATASETS.register("fashion_mnist", DatasetSpec(
    "fashion_mnist", load_fashion_mnist, 10, 1, 28, "/usr/share/datasets/fashion-mnist",
    download_fashion_mnist, "Fashion-MNIST, IDX .gz files (Debian or torchvision layout)",
))
DATASETS.register("cifar10", DatasetSpec(
    "cifar10", cifar_loader(CIFAR10), 10, 3, 32, "data", cifar_downloader(CIFAR10),
    "CIFAR-10, torchvision python-pickle layout",
))
DATASETS.register("cifar100", DatasetSpec(
    "cifar100", cifar_loader(CIFAR100), 100, 3, 32, "data", cifar_downloader(CIFAR100),
    "CIFAR-100 fine labels, torchvision python-pickle layout",
))
DATASETS.register("tiny_imagenet", DatasetSpec(
    "tiny_imagenet", load_tiny_imagenet, 200, 3, TINY_SIZE, "data", None,
    "Tiny ImageNet, tiny-imagenet-200/ folder; val/ is the test split",
))
DATASETS.register("image_folder", DatasetSpec(
    "image_folder", load_image_folder, None, None, None, None, None,
    "<root>/train/<class>/* and <root>/test/<class>/* (or val/); streamed when large (dataset.stream)",
    files=lambda root: class_folder_files(root, "image_folder"),
))
DATASETS.register("imagenet", DatasetSpec(
    "imagenet", _no_ram_copy, None, 3, STREAM_SIZE, None, None,
    "ILSVRC-2012 class folders <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; streamed",
    files=lambda root: class_folder_files(root, "imagenet", test_dirs=("val",)),
    always_stream=True,
))
