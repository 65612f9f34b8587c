"""Tiny stand-in datasets written in exactly the real on-disk formats, for tests.

Each `make_*` writes under `root` and returns a `FakeDataset` with what a correct loader must
produce: images as uint8 [N, C, H, W] numpy arrays (lists of [C, H, W] arrays for the image
folder, whose images have mixed sizes), int64 labels and class names, in the loader's order.

    from tests.fakedata import make_cifar10
    fake = make_cifar10(tmp_path, n_train=50, n_test=20)
    data = load_data(DatasetConfig(name="cifar10", root=str(fake.root)))
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class FakeDataset:
    root: Path  # what to pass as dataset.root
    train_images: np.ndarray | list[np.ndarray]  # uint8 [N, C, H, W] (list of [C, H, W] if sizes differ)
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray | list[np.ndarray]
    test_labels: np.ndarray
    class_names: list[str]
    files: list[Path]  # every file written


def _images(rng: np.random.Generator, n: int, channels: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, channels, height, width), dtype=np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Every class appears (when n >= num_classes), then the rest at random, shuffled."""
    base = np.arange(n) % num_classes
    return rng.permutation(base).astype(np.int64)


# ----------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_fashion_mnist(
    root: str | Path,
    n_train: int = 40,
    n_test: int = 20,
    seed: int = 0,
    layout: str = "debian",
    compress: bool = True,
) -> FakeDataset:
    """IDX files like Fashion-MNIST's. layout "debian": files directly in root; "torchvision":
    in <root>/FashionMNIST/raw/. `compress` writes the .gz names (False: the raw names)."""
    root = Path(root)
    folder = root if layout == "debian" else root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out, files = {}, []
    for which, n in (("train", n_train), ("test", n_test)):
        images = _images(rng, n, 1, 28, 28)
        labels = _labels(rng, n, 10)
        for stem, array in zip(FASHION_FILES[which], (images[:, 0], labels.astype(np.uint8))):
            raw = idx_bytes(array)
            path = folder / (stem + ".gz" if compress else stem)
            path.write_bytes(gzip.compress(raw) if compress else raw)
            files.append(path)
        out[which] = (images, labels)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return FakeDataset(root, *out["train"], *out["test"], names, files)


# ----------------------------------------------------------------------------- CIFAR


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 with bytes written as Python 2 `str` opcodes (SHORT_BINSTRING / BINSTRING),
    as in the real CIFAR files (pickled by Python 2's cPickle). Python 3's own protocol 2 would
    wrap every bytes object in a `_codecs.encode(..., 'latin1')` call instead."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _pickle(path: Path, obj: object) -> Path:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())
    return path


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1)  # [N, 3072]: R plane, G plane, B plane


def make_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> FakeDataset:
    """cifar-10-batches-py/: data_batch_1..5 (n_train split over them), test_batch, batches.meta."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_images, train_labels = _images(rng, n_train, 3, 32, 32), _labels(rng, n_train, 10)
    test_images, test_labels = _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, 10)
    files = []
    bounds = np.linspace(0, n_train, 6).astype(int)
    for i in range(5):
        part = slice(bounds[i], bounds[i + 1])
        files.append(_pickle(folder / f"data_batch_{i + 1}", {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": [int(v) for v in train_labels[part]],
            b"data": _cifar_rows(train_images[part]),
            b"filenames": [f"img_{j}.png".encode() for j in range(bounds[i], bounds[i + 1])],
        }))
    files.append(_pickle(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in test_labels],
        b"data": _cifar_rows(test_images),
        b"filenames": [f"test_{j}.png".encode() for j in range(n_test)],
    }))
    files.append(_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": int(bounds[1]),
        b"label_names": [n.encode() for n in names],
        b"num_vis": 3072,
    }))
    return FakeDataset(root, train_images, train_labels, test_images, test_labels, names, files)


def make_cifar100(root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> FakeDataset:
    """cifar-100-python/: train, test, meta, with fine and coarse labels (loaders use fine)."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    out, files = {}, []
    for which, n in (("train", n_train), ("test", n_test)):
        images, fine = _images(rng, n, 3, 32, 32), _labels(rng, n, 100)
        files.append(_pickle(folder / which, {
            b"filenames": [f"{which}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{which}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": _cifar_rows(images),
        }))
        out[which] = (images, fine)
    files.append(_pickle(folder / "meta", {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }))
    return FakeDataset(root, *out["train"], *out["test"], fine_names, files)


# ----------------------------------------------------------------------------- image files


def _decoded(path: Path, mode: str) -> np.ndarray:
    """What a decoder returns for the written file (JPEG is lossy), as [C, H, W]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _smooth_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A blurry random picture [H, W(, C)] (compresses sensibly as JPEG)."""
    small = rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    image = Image.fromarray(small if channels == 3 else small[:, :, 0]).resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def make_tiny_imagenet(
    root: str | Path,
    wnids: Sequence[str] = ("n02124075", "n01443537", "n09999999"),
    n_train_per_class: int = 3,
    n_val: int = 6,
    seed: int = 0,
    words: bool = True,
    size: int = 64,
) -> FakeDataset:
    """tiny-imagenet-200/: wnids.txt (unsorted, like the real one), words.txt (optional),
    train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt, val/images/val_<i>.JPEG +
    val/val_annotations.txt, test/images/. The first training image of each class and val_0
    are grayscale JPEGs, which loaders replicate to 3 channels. Classes are sorted by wnid."""
    root = Path(root)
    base = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    files = []
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    files.append(base / "wnids.txt")
    sorted_ids = sorted(wnids)
    names = [f"thing {w[-3:]}" for w in sorted_ids]
    if words:
        extra = "n00000001\tentity\n"  # words.txt lists many more wnids than the 200 used
        (base / "words.txt").write_text(extra + "".join(f"{w}\tthing {w[-3:]}, other name\n" for w in wnids))
        files.append(base / "words.txt")
    else:
        names = list(sorted_ids)

    def write_jpeg(path: Path, gray: bool) -> np.ndarray:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth_image(rng, size, size, 1 if gray else 3)).save(path, "JPEG", quality=90)
        files.append(path)
        return _decoded(path, "RGB")

    train_images, train_labels = [], []
    for label, wnid in enumerate(sorted_ids):
        folder = base / "train" / wnid
        boxes = []
        for i in range(n_train_per_class):
            train_images.append(write_jpeg(folder / "images" / f"{wnid}_{i}.JPEG", gray=i == 0))
            train_labels.append(label)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
        (folder / f"{wnid}_boxes.txt").write_text("".join(boxes))

    test_images, test_labels, annotations = [], [], []
    for i in range(n_val):
        label = i % len(sorted_ids)
        test_images.append(write_jpeg(base / "val" / "images" / f"val_{i}.JPEG", gray=i == 0))
        test_labels.append(label)
        annotations.append(f"val_{i}.JPEG\t{sorted_ids[label]}\t1\t2\t{size - 2}\t{size - 3}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(annotations))
    files.append(base / "val" / "val_annotations.txt")
    write_jpeg(base / "test" / "images" / "test_0.JPEG", gray=False)  # unlabeled; never loaded
    return FakeDataset(
        root, np.stack(train_images), np.array(train_labels, dtype=np.int64),
        np.stack(test_images), np.array(test_labels, dtype=np.int64), names, files,
    )


def make_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("dog", "cat", "bird"),
    n_train_per_class: int = 3,
    n_test_per_class: int = 2,
    sizes: Sequence[tuple[int, int]] = ((12, 10), (16, 16), (9, 14)),
    test_dir: str = "test",
    grayscale: bool = False,
    seed: int = 0,
) -> FakeDataset:
    """<root>/train/<class>/img_<i>.png and <root>/<test_dir>/<class>/img_<i>.png, lossless PNGs
    whose (width, height) cycle through `sizes`. Returned in loader order: classes sorted by name,
    files sorted by name; images are [C, H, W] arrays, stacked when all sizes are equal."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    channels = 1 if grayscale else 3
    files = []
    out = {}
    counter = 0
    for which, folder_name, n in (("train", "train", n_train_per_class), ("test", test_dir, n_test_per_class)):
        images, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            folder = root / folder_name / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                width, height = sizes[counter % len(sizes)]
                counter += 1
                pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
                path = folder / f"img_{i}.png"
                Image.fromarray(pixels[:, :, 0] if grayscale else pixels).save(path)
                files.append(path)
                images.append(pixels.transpose(2, 0, 1))
                labels.append(label)
        same = len({im.shape for im in images}) == 1
        out[which] = (np.stack(images) if same else images, np.array(labels, dtype=np.int64))
    return FakeDataset(root, *out["train"], *out["test"], sorted(classes), files)


def make_imagenet(
    root: str | Path,
    wnids: Sequence[str] = ("n01440764", "n01443537", "n01484850"),
    n_train_per_class: int = 8,
    n_val_per_class: int = 2,
    sides: tuple[int, int] = (40, 80),
    seed: int = 0,
) -> list[Path]:
    """ILSVRC-2012 in class folders: <root>/train/<wnid>/<wnid>_<i>.JPEG and
    <root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG (the layout the common val-prep step leaves), JPEGs
    of random width and height in `sides` (the real ones vary, 256-500 px and more). The first
    training image of each class is grayscale, as some of ImageNet's are. Returns the files."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    files = []
    n_val = 0
    for wnid in wnids:
        for which, n in (("train", n_train_per_class), ("val", n_val_per_class)):
            folder = root / which / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
                gray = which == "train" and i == 0
                if which == "train":
                    path = folder / f"{wnid}_{i}.JPEG"
                else:
                    n_val += 1
                    path = folder / f"ILSVRC2012_val_{n_val:08d}.JPEG"
                Image.fromarray(_smooth_image(rng, height, width, 1 if gray else 3)).save(path, "JPEG", quality=90)
                files.append(path)
    return files
