"""The files of the registered datasets: each on-disk format read into uint8 images in RAM.

One reader per format, each returning a `Loaded` (train and test `Split`s, class names):

* Fashion-MNIST: IDX .gz files (Debian's dataset-fashion-mnist, or torchvision's
  `<root>/FashionMNIST/raw/`); 1 x 28 x 28, 10 classes.
* CIFAR-10 / CIFAR-100: torchvision's python-pickle layout; CIFAR-100 uses the fine labels.
* Tiny ImageNet: the standard `tiny-imagenet-200/` folder; its `val/` split is the test split
  (METHOD 2.1); grayscale images are replicated to 3 channels.
* image folders: `<root>/train/<class>/*` and `<root>/test/<class>/*` (or `val/`).

A reader only parses files and reports what is wrong with them (`DataError` naming the file and
the fix); `common.data.registry` registers the readers as datasets and does everything after reading
(statistics, splits, normalisation), so a new format is one reader here and one `DatasetSpec`
there.
"""
from __future__ import annotations

import gzip
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import DataError


# ----------------------------------------------------------------------------- what a reader returns


@dataclass
class Split:
    """One split of a dataset: what a reader returns per split and what `common.data.registry.Data` holds."""

    images: torch.Tensor  # uint8 [N, C, H, W] in RAM (METHOD 2.1); a streamed split holds a common.data.stream.FileImages
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Loaded:
    """What a dataset loader returns, before normalisation statistics and splits."""

    train: Split
    test: Split
    class_names: list[str]


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bilinear with antialias, in chunks.

    Here, beside the readers, because `decode_images` resizes images of mixed sizes one by one;
    `common.data.registry.load_data` uses it for `dataset.image_size`."""
    if images.shape[2] == size and images.shape[3] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float32)
        resized = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08  # element type code for unsigned bytes
FASHION_HINT = "install Debian's dataset-fashion-mnist (make setup) or pass dataset.root=DIR holding the IDX .gz files"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in .gz) holding unsigned bytes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); expected a gzip-compressed IDX file, re-copy it") from None
    magic = (IDX_UBYTE << 8) | ndim
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise DataError(f"{path}: bad IDX header (magic {found}, expected {magic:08x} for a {ndim}-d ubyte array); re-copy the file")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(f"{path}: IDX header says {dims} ({size} bytes) but {len(raw) - header} bytes follow; the file is truncated or corrupt, re-copy it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"fashion_mnist: {root / (stem + '.gz')} not found; {FASHION_HINT}")


def load_fashion_mnist(root: Path, image_size: int | None) -> Loaded:
    """The four IDX files under `root` (or `root/FashionMNIST/raw/`); one size, so no resizing here."""
    splits: dict[str, Split] = {}
    for which, (image_stem, label_stem) in IDX_FILES.items():
        image_path, label_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
        images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"fashion_mnist: {image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels; re-copy both files")
        splits[which] = Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return Loaded(splits["train"], splits["test"], list(FASHION_MNIST_CLASSES))


def download_fashion_mnist(root: Path) -> None:
    """torchvision's download (needs network), into the layout `load_fashion_mnist` reads."""
    import torchvision

    for train in (True, False):  # writes <root>/FashionMNIST/raw/, which the loader reads
        torchvision.datasets.FashionMNIST(str(root), train=train, download=True)


# ----------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarLayout:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch", "batches.meta", b"labels", b"label_names",
)
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names",
)


def _unpickle(path: Path, layout: CifarLayout, keys: Sequence[bytes]) -> dict:
    if not path.is_file():
        raise DataError(f"{layout.name}: {path} not found; pass dataset.root=DIR holding {layout.folder}/ (torchvision's layout) or set dataset.download=true")
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DataError(f"{layout.name}: {path} is not a readable CIFAR pickle ({type(exc).__name__}); re-extract the archive") from None
    missing = [k.decode() for k in keys if not isinstance(content, dict) or k not in content]
    if missing:
        raise DataError(f"{layout.name}: {path} lacks key(s) {', '.join(missing)}; expected a {layout.name} python-pickle batch, re-extract the archive")
    return content


def _cifar_split(paths: Sequence[Path], layout: CifarLayout) -> Split:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path, layout, (b"data", layout.label_key))
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        target = np.asarray(batch[layout.label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{layout.name}: {path} data has shape {data.shape}, expected [N, 3072]; re-extract the archive")
        if data.shape[0] != target.shape[0]:
            raise DataError(f"{layout.name}: {path} holds {data.shape[0]} images but {target.shape[0]} labels; re-extract the archive")
        images.append(data)
        labels.append(target)
    # each row is three 32 x 32 channel planes, so it reshapes straight to [N, 3, 32, 32]
    stacked = np.concatenate(images).reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(stacked), torch.from_numpy(np.concatenate(labels)))


def cifar_loader(layout: CifarLayout) -> Callable[[Path, int | None], Loaded]:
    """The reader of one CIFAR variant: `<root>/<layout.folder>/` in torchvision's pickle layout."""
    def load(root: Path, image_size: int | None) -> Loaded:
        folder = root / layout.folder
        meta = _unpickle(folder / layout.meta_file, layout, (layout.names_key,))
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key]]
        train = _cifar_split([folder / f for f in layout.train_files], layout)
        test = _cifar_split([folder / layout.test_file], layout)
        return Loaded(train, test, names)

    return load


def cifar_downloader(layout: CifarLayout) -> Callable[[Path], None]:
    """torchvision's download of one CIFAR variant (needs network), into the layout its reader reads."""
    def download(root: Path) -> None:
        import torchvision

        dataset = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[layout.name]
        dataset(str(root), download=True)

    return download


# ----------------------------------------------------------------------------- image files


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _decode(path: Path, mode: str | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if mode is not None:
                image = image.convert(mode)
            elif image.mode not in ("L", "RGB"):
                image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
            return np.array(image, dtype=np.uint8)  # a writable copy for torch.from_numpy
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); remove or replace the file") from None


def decode_images(paths: Sequence[Path], mode: str | None, size: int | None, name: str, where: Path) -> torch.Tensor:
    """Decode image files in parallel into uint8 [N, C, H, W].

    mode "RGB"/"L" forces channels; None keeps grayscale as 1 channel unless any image has
    colour. Images are resized to `size` one by one when given (mixed native sizes);
    otherwise they must all share one size.
    """
    workers = min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda p: _decode(p, mode), paths))
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    shapes = {a.shape[:2] for a in arrays}
    if size is None and len(shapes) > 1:
        examples = ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:3])
        raise DataError(f"{name}: images under {where} have different sizes ({examples}, ...); set dataset.image_size=N to resize them all")
    out_h, out_w = (size, size) if size is not None else next(iter(shapes))
    out = torch.empty((len(arrays), channels, out_h, out_w), dtype=torch.uint8)
    for i, array in enumerate(arrays):
        image = torch.from_numpy(array)
        image = image.permute(2, 0, 1) if image.dim() == 3 else image.unsqueeze(0).expand(channels, -1, -1)
        if image.shape[1:] != (out_h, out_w):
            image = resize_images(image.unsqueeze(0), out_h)[0]
        out[i] = image
    return out


def _listed_images(folder: Path, name: str, what: str) -> list[Path]:
    extensions = _image_extensions()
    # os.scandir: the entry's type comes with the listing, no stat per file (listing 200 000
    # files here: 3.0 s instead of 3.9 s; ImageNet has 1.33 M)
    with os.scandir(folder) as entries:
        files = sorted(folder / e.name for e in entries if os.path.splitext(e.name)[1].lower() in extensions and e.is_file())
    if not files:
        raise DataError(f"{name}: {folder} holds no image files; expected {what}")
    return files


# ----------------------------------------------------------------------------- Tiny ImageNet

TINY_FOLDER = "tiny-imagenet-200"
TINY_SIZE = 64


def _read_lines(path: Path, name: str, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{name}: {path} not found; expected {what} of the standard {TINY_FOLDER}/ layout under dataset.root")
    return [line for line in path.read_text().splitlines() if line.strip()]


def load_tiny_imagenet(root: Path, image_size: int | None) -> Loaded:
    """`root/tiny-imagenet-200/` (or that folder itself): train/<wnid>/images/ and val/ with its
    annotations as the test split; decoded as RGB at `image_size` (default 64)."""
    name = "tiny_imagenet"
    base = root / TINY_FOLDER
    if not base.is_dir() and (root / "wnids.txt").is_file():
        base = root  # root is the tiny-imagenet-200 folder itself
    wnids = sorted({line.strip() for line in _read_lines(base / "wnids.txt", name, "one WordNet id per line")})
    index = {wnid: i for i, wnid in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for line in _read_lines(base / "words.txt", name, "wnid<TAB>names"):
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    names = [words.get(wnid) or wnid for wnid in wnids]

    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{name}: {folder} not found; expected the training JPEGs of class {wnid}")
        files = _listed_images(folder, name, f"the training JPEGs of class {wnid}")
        train_paths += files
        train_labels += [index[wnid]] * len(files)

    annotations = base / "val" / "val_annotations.txt"
    test_paths, test_labels = [], []
    for number, line in enumerate(_read_lines(annotations, name, "lines 'file<TAB>wnid<TAB>box'"), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DataError(f"{name}: {annotations} line {number} names no known class ({line[:60]!r}); expected 'file<TAB>wnid' with a wnid from wnids.txt")
        path = base / "val" / "images" / fields[0].strip()
        if not path.is_file():
            raise DataError(f"{name}: {path} (listed in {annotations}) not found; re-extract the archive")
        test_paths.append(path)
        test_labels.append(index[fields[1].strip()])

    size = image_size if image_size is not None else TINY_SIZE
    train = Split(decode_images(train_paths, "RGB", size, name, base / "train"), torch.tensor(train_labels, dtype=torch.int64))
    test = Split(decode_images(test_paths, "RGB", size, name, base / "val"), torch.tensor(test_labels, dtype=torch.int64))
    return Loaded(train, test, names)


# ----------------------------------------------------------------------------- image folder


def class_folder_files(root: Path, name: str, test_dirs: Sequence[str] = ("test", "val")) -> tuple[dict[str, list[Path]], dict[str, list[int]], list[str]]:
    """({"train": files, "test": files}, their labels, class names) of `root/train/<class>/*` and
    the first of `root/<test_dirs>/<class>/*` that exists; classes are the training folders,
    sorted (torchvision's ImageFolder order, which torchvision's ImageNet class indices follow).

    An empty class folder, a test class without training folder, or a split without class
    folders is a DataError naming the folder."""
    train_dir = root / "train"
    test_dir = next((root / d for d in test_dirs if (root / d).is_dir()), root / test_dirs[0])
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise DataError(f"{name}: {folder} not found; expected {root}/train/<class>/* and {root}/{'/ or '.join(test_dirs)}/<class>/*")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{name}: {train_dir} has no class folders; expected {train_dir}/<class>/<images>")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in index)
    if unknown:
        raise DataError(f"{name}: {test_dir / unknown[0]} is a class with no folder in {train_dir}; every {test_dir.name} class needs training images")

    paths: dict[str, list[Path]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for which, folder in (("train", train_dir), ("test", test_dir)):
        for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            files = _listed_images(folder / cls, name, f"the images of class '{cls}'")
            paths[which] += files
            labels[which] += [index[cls]] * len(files)
    if not paths["test"]:
        raise DataError(f"{name}: {test_dir} has no class folders; expected {test_dir}/<class>/<images>")
    return paths, labels, classes


def load_image_folder(root: Path, image_size: int | None) -> Loaded:
    """`root/train/<class>/*` and `root/test/<class>/*` (or val/); classes are the training folders, sorted."""
    name = "image_folder"
    paths, labels, classes = class_folder_files(root, name)
    # decode both splits together so that they agree on channels and size
    images = decode_images(paths["train"] + paths["test"], None, image_size, name, root)
    n_train = len(paths["train"])
    train = Split(images[:n_train].clone(), torch.tensor(labels["train"], dtype=torch.int64))
    test = Split(images[n_train:].clone(), torch.tensor(labels["test"], dtype=torch.int64))
    return Loaded(train, test, classes)
