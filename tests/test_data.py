"""Dataset registry (METHOD 2): on-disk formats, statistics, splits, augmentation, bad input."""
from __future__ import annotations

import gzip
import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import DatasetConfig
from common.data.registry import DATASETS, Data, augment_batch, balanced_subset, channel_stats, class_counts, load_data, validation_split
from common.errors import ConfigError, DataError
from common.registry import UnknownNameError
from tests.fakedata import (
    idx_bytes,
    make_cifar10,
    make_cifar100,
    make_fashion_mnist,
    make_image_folder,
    make_tiny_imagenet,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def load(name: str, root: Path, **kwargs) -> Data:
    return load_data(DatasetConfig(name=name, root=str(root), **kwargs))


def numpy_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """METHOD 2.2 computed directly: [0,1] pixels, per channel, unbiased std + 1e-8."""
    x = images.astype(np.float64) / 255.0
    axes = (0, 2, 3)
    return x.mean(axis=axes), x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).std(axis=1, ddof=1) + 1e-8


def assert_round_trip(data: Data, fake, channels: int, size: int) -> None:
    for split, images, labels in ((data.train, fake.train_images, fake.train_labels), (data.test, fake.test_images, fake.test_labels)):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert tuple(split.images.shape) == (len(labels), channels, size, size)
        np.testing.assert_array_equal(split.images.numpy(), images)
        np.testing.assert_array_equal(split.labels.numpy(), labels)
    assert data.class_names == fake.class_names
    assert data.num_classes == len(fake.class_names)
    assert data.in_channels == channels and data.image_size == size
    mean, std = numpy_stats(np.asarray(fake.train_images))
    np.testing.assert_allclose(data.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), std, rtol=1e-6)


def one_line_error(exc_info, *fragments: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("layout,compress", [("debian", True), ("torchvision", True), ("torchvision", False)])
def test_fashion_mnist_round_trip(tmp_path, layout, compress):
    fake = make_fashion_mnist(tmp_path, n_train=30, n_test=12, layout=layout, compress=compress)
    data = load("fashion_mnist", tmp_path)
    assert_round_trip(data, fake, 1, 28)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_cifar10_round_trip(tmp_path):
    fake = make_cifar10(tmp_path, n_train=37, n_test=11)
    assert_round_trip(load("cifar10", tmp_path), fake, 3, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    fake = make_cifar100(tmp_path, n_train=120, n_test=40)
    data = load("cifar100", tmp_path)
    assert_round_trip(data, fake, 3, 32)
    assert data.num_classes == 100 and int(data.train.labels.max()) > 19  # not the 20 coarse labels


def test_cifar_channel_planes_are_not_interleaved(tmp_path):
    fake = make_cifar10(tmp_path, n_train=10, n_test=10)
    row = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes")[b"data"][0]
    data = load("cifar10", tmp_path)
    # the first 1024 bytes of a CIFAR row are the red plane, row-major
    np.testing.assert_array_equal(data.train.images[0, 0].numpy().reshape(-1), row[:1024])
    np.testing.assert_array_equal(data.train.images[0, 2, 31].numpy(), row[-32:])
    assert fake.train_images.shape[0] == 10


@pytest.mark.parametrize("words", [True, False])
def test_tiny_imagenet_round_trip(tmp_path, words):
    fake = make_tiny_imagenet(tmp_path, n_train_per_class=2, n_val=5, words=words, size=64)
    data = load("tiny_imagenet", tmp_path)
    assert_round_trip(data, fake, 3, 64)
    assert data.class_names == (["thing 537", "thing 075", "thing 999"] if words else ["n01443537", "n02124075", "n09999999"])
    gray = data.train.images[0]  # first image of the first class is a grayscale JPEG
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(data.train.images[1, 0], data.train.images[1, 2])


def test_image_folder_same_size_round_trip(tmp_path):
    fake = make_image_folder(tmp_path, sizes=[(10, 10)], n_train_per_class=2, n_test_per_class=1)
    data = load("image_folder", tmp_path)
    assert_round_trip(data, fake, 3, 10)
    assert data.class_names == ["bird", "cat", "dog"]


def test_image_folder_grayscale_and_val_dir(tmp_path):
    fake = make_image_folder(tmp_path, sizes=[(8, 8)], test_dir="val", grayscale=True)
    data = load("image_folder", tmp_path)
    assert_round_trip(data, fake, 1, 8)


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    fake = make_image_folder(tmp_path, sizes=[(12, 10), (16, 16), (9, 14)])
    with pytest.raises(DataError) as exc:
        load("image_folder", tmp_path)
    one_line_error(exc, "different sizes", "dataset.image_size")
    data = load("image_folder", tmp_path, image_size=12)
    assert tuple(data.train.images.shape) == (9, 3, 12, 12) and tuple(data.test.images.shape) == (6, 3, 12, 12)
    np.testing.assert_array_equal(data.train.labels.numpy(), fake.train_labels)
    # bilinear antialiased downscaling roughly keeps an image's mean brightness
    index = next(i for i, im in enumerate(fake.train_images) if im.shape[1:] == (16, 16))
    assert abs(data.train.images[index].double().mean() - fake.train_images[index].mean()) < 3


def test_image_size_resizes_and_keeps_constant_images(tmp_path):
    make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16).reshape(20, 28, 28).copy()
    images[3] = 77  # a flat image stays flat under any interpolation
    path.write_bytes(gzip.compress(idx_bytes(images)))
    data = load("fashion_mnist", tmp_path, image_size=20)
    assert tuple(data.train.images.shape) == (20, 1, 20, 20) and tuple(data.test.images.shape) == (10, 1, 20, 20)
    assert data.image_size == 20
    assert bool((data.train.images[3] == 77).all())


def test_real_fashion_mnist():
    data = load_data(DatasetConfig())  # the default dataset at its default root
    assert data.name == "fashion_mnist" and data.num_classes == 10
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert tuple(data.train.images.shape) == (60000, 1, 28, 28)
    raw_labels = np.frombuffer(gzip.decompress((REAL_FASHION / "train-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    np.testing.assert_array_equal(data.train.labels.numpy(), raw_labels)
    assert torch.equal(torch.bincount(data.train.labels), torch.full((10,), 6000))
    mean, std = numpy_stats(data.train.images.numpy())
    np.testing.assert_allclose(data.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), std, rtol=1e-6)
    assert 0.25 < float(data.mean) < 0.35 and 0.3 < float(data.std) < 0.4  # the well-known 0.286 / 0.353


# ----------------------------------------------------------------------------- statistics, normalisation, fingerprint


def test_channel_stats_match_float_computation():
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    images[:, 1] = 200  # constant channel: std is exactly the epsilon
    mean, std = channel_stats(images)
    expected_mean, expected_std = numpy_stats(images.numpy())
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-6)
    assert mean.dtype == torch.float32 and float(std[1]) == pytest.approx(1e-8)


def test_normalize(tmp_path):
    make_cifar10(tmp_path, n_train=40, n_test=10)
    data = load("cifar10", tmp_path)
    x = data.normalize(data.train.images, "cpu")
    assert x.dtype == torch.float32 and x.shape == data.train.images.shape
    expected = (data.train.images.double() / 255 - data.mean.double().view(1, 3, 1, 1)) / data.std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), rtol=0, atol=1e-5)
    assert data.train.images.dtype == torch.uint8  # source untouched
    with pytest.raises(TypeError):
        data.normalize(x)


def test_fingerprint_stable_and_sensitive(tmp_path):
    make_fashion_mnist(tmp_path, n_train=20, n_test=10)
    first = load("fashion_mnist", tmp_path)
    assert load("fashion_mnist", tmp_path).fingerprint == first.fingerprint
    assert load("fashion_mnist", tmp_path, val_size=10).fingerprint == first.fingerprint  # split is not preprocessing
    assert load("fashion_mnist", tmp_path, image_size=14).fingerprint != first.fingerprint
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=8).copy()
    labels[0] = (labels[0] + 1) % 10
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    assert load("fashion_mnist", tmp_path).fingerprint != first.fingerprint


# ----------------------------------------------------------------------------- subsets and splits


def test_balanced_subset_seeded_balanced_sorted():
    labels = torch.arange(103) % 5
    a = balanced_subset(labels, 4, seed=1)
    assert torch.equal(a, balanced_subset(labels, 4, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 4, seed=2))
    assert torch.equal(torch.bincount(labels[a], minlength=5), torch.full((5,), 4))
    assert torch.equal(a, torch.sort(a).values) and len(torch.unique(a)) == 20
    assert set(balanced_subset(labels, 2, seed=1).tolist()) <= set(a.tolist())  # nested
    pool = torch.arange(0, 103, 2)
    b = balanced_subset(labels, 3, seed=0, pool=pool)
    assert set(b.tolist()) <= set(pool.tolist())
    with pytest.raises(DataError) as exc:
        balanced_subset(labels, 11, seed=0, pool=pool)
    one_line_error(exc, "requested")


def test_validation_split():
    labels = torch.arange(100) % 4
    train, val = validation_split(labels, 4, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(100))
    assert sorted(torch.bincount(labels[val], minlength=4).tolist()) == [2, 2, 3, 3]
    same_train, same_val = validation_split(labels, 4, 10, seed=3)
    assert torch.equal(val, same_val) and torch.equal(train, same_train)
    assert not torch.equal(val, validation_split(labels, 4, 10, seed=4)[1])
    train0, val0 = validation_split(labels, 4, 0, seed=3)
    assert len(val0) == 0 and torch.equal(train0, torch.arange(100))
    with pytest.raises(ConfigError) as exc:
        validation_split(labels, 4, 100, seed=0)
    one_line_error(exc, "dataset.val_size=100", "between 0 and 96")


def test_load_data_val_split_and_training_subset(tmp_path):
    make_fashion_mnist(tmp_path, n_train=100, n_test=10)
    data = load("fashion_mnist", tmp_path, val_size=20, split_seed=5)
    assert len(data.val_indices) == 20 and len(data.train_indices) == 80
    assert torch.equal(torch.bincount(data.train.labels[data.val_indices], minlength=10), torch.full((10,), 2))
    assert set(data.train_indices.tolist()).isdisjoint(data.val_indices.tolist())
    subset = data.training_subset(35, seed=1)  # floor(35 / 10) = 3 per class
    assert len(subset) == 30 and set(subset.tolist()) <= set(data.train_indices.tolist())
    assert torch.equal(class_counts(data.train.labels, 10, subset), torch.full((10,), 3))
    assert torch.equal(subset, data.training_subset(35, seed=1))
    assert torch.equal(data.training_subset(None, seed=1), data.train_indices)
    with pytest.raises(ConfigError) as exc:
        data.training_subset(1000, seed=1)
    one_line_error(exc, "train_subset", "between 10 and 80")
    with pytest.raises(ConfigError):
        load("fashion_mnist", tmp_path, val_size=100)


# ----------------------------------------------------------------------------- augmentation


def reference_crop_flip(x: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(pad 4, zero fill) at offset (dy, dx), then an optional flip."""
    h, w = x.shape[-2:]
    out = F.pad(x, (4, 4, 4, 4))[..., dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def test_augment_batch_is_a_per_sample_crop_and_flip():
    x = torch.randn(48, 2, 6, 7)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1)))
    choices = set()
    for i in range(x.shape[0]):
        matches = [
            (dy, dx, flip)
            for dy, dx, flip in itertools.product(range(9), range(9), (False, True))
            if torch.equal(out[i], reference_crop_flip(x[i], dy, dx, flip))
        ]
        assert len(matches) >= 1, f"sample {i} is no crop/flip of its input"
        choices.add(matches[0])
    assert len(choices) > 10 and {c[2] for c in choices} == {False, True}  # varies per sample


# ----------------------------------------------------------------------------- bad input


def test_unknown_dataset_name():
    with pytest.raises(UnknownNameError) as exc:
        load_data(DatasetConfig(name="cifar_10"))
    assert "cifar10" in str(exc.value)
    assert set(DATASETS.names()) == {"fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "image_folder", "imagenet"}


def test_missing_root_and_files(tmp_path):
    with pytest.raises(DataError) as exc:
        load("cifar10", tmp_path / "nowhere")
    one_line_error(exc, str(tmp_path / "nowhere"), "dataset.root")
    with pytest.raises(DataError) as exc:
        load("fashion_mnist", tmp_path)
    one_line_error(exc, str(tmp_path / "train-images-idx3-ubyte.gz"), "dataset.root")
    with pytest.raises(DataError) as exc:
        load("cifar100", tmp_path)
    one_line_error(exc, str(tmp_path / "cifar-100-python" / "meta"), "not found")
    with pytest.raises(ConfigError):
        load_data(DatasetConfig(name="image_folder"))  # no default root
    with pytest.raises(ConfigError):
        load("tiny_imagenet", tmp_path, download=True)  # no downloader


def test_missing_cifar_batch(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError) as exc:
        load("cifar10", tmp_path)
    one_line_error(exc, "data_batch_4", "not found")


def test_bad_idx_magic_and_truncation(tmp_path):
    make_fashion_mnist(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + bytes(raw[4:])))  # labels magic on an image file
    with pytest.raises(DataError) as exc:
        load("fashion_mnist", tmp_path)
    one_line_error(exc, str(path), "magic", "00000803")
    path.write_bytes(gzip.compress(bytes(raw[:-5])))
    with pytest.raises(DataError) as exc:
        load("fashion_mnist", tmp_path)
    one_line_error(exc, str(path), "truncated")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as exc:
        load("fashion_mnist", tmp_path)
    one_line_error(exc, str(path))


def test_idx_count_mismatch(tmp_path):
    make_fashion_mnist(tmp_path, n_train=10, n_test=10)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(DataError) as exc:
        load("fashion_mnist", tmp_path)
    one_line_error(exc, "10 images", "9 labels")


def test_malformed_cifar_pickles(tmp_path):
    make_cifar10(tmp_path, n_train=20, n_test=10)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError) as exc:
        load("cifar10", tmp_path)
    one_line_error(exc, str(folder / "data_batch_2"), "pickle")
    with (folder / "data_batch_2").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, handle)
    with pytest.raises(DataError) as exc:
        load("cifar10", tmp_path)
    one_line_error(exc, str(folder / "data_batch_2"), "labels")
    with (folder / "data_batch_2").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, handle)
    with pytest.raises(DataError) as exc:
        load("cifar10", tmp_path)
    one_line_error(exc, "2 images", "3 labels")


def test_malformed_tiny_imagenet(tmp_path):
    make_tiny_imagenet(tmp_path, n_train_per_class=1, n_val=3, size=16)
    base = tmp_path / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good + "val_9.JPEG\tn12345678\t0\t0\t1\t1\n")
    with pytest.raises(DataError) as exc:
        load("tiny_imagenet", tmp_path)
    one_line_error(exc, str(annotations), "line 4")
    annotations.write_text(good + "val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError) as exc:
        load("tiny_imagenet", tmp_path)
    one_line_error(exc, "val_9.JPEG", "not found")
    annotations.unlink()
    with pytest.raises(DataError) as exc:
        load("tiny_imagenet", tmp_path)
    one_line_error(exc, str(annotations))
    (base / "val" / "images" / "val_1.JPEG").write_bytes(b"not a jpeg")
    annotations.write_text(good)
    with pytest.raises(DataError) as exc:
        load("tiny_imagenet", tmp_path)
    one_line_error(exc, "val_1.JPEG", "cannot decode")


def test_tiny_imagenet_non_native_size_is_resized(tmp_path):
    make_tiny_imagenet(tmp_path, n_train_per_class=1, n_val=3, size=16)
    data = load("tiny_imagenet", tmp_path)
    assert tuple(data.train.images.shape) == (3, 3, 64, 64)


def test_malformed_image_folder(tmp_path):
    make_image_folder(tmp_path, sizes=[(8, 8)])
    empty = tmp_path / "train" / "emu"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        load("image_folder", tmp_path)
    one_line_error(exc, str(empty), "no image files")
    empty.rmdir()
    (tmp_path / "test" / "yak").mkdir()
    with pytest.raises(DataError) as exc:
        load("image_folder", tmp_path)
    one_line_error(exc, "yak", "training images")
    with pytest.raises(DataError) as exc:
        load("image_folder", tmp_path / "train")
    one_line_error(exc, str(tmp_path / "train" / "train"), "not found")
