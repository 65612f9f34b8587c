"""Streamed datasets (issue 21): ImageNet's class-folder layout read from files per batch.

On generated JPEGs of random sizes in the real layout (tests/fakedata.py `make_imagenet`):
the transforms, the file-index fingerprint, the same S/I/E/Q as the in-RAM path on the same
folder, a run resumed mid-training with loader workers ending with the uninterrupted run's
metrics, each bad input, and stage 1 + 2 + 3 end to end with a torchvision teacher used as it is.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common import distill
from common.artifacts.layout import dir_name
from common.config import DatasetConfig, load_config
from common.data.registry import load_data
from common.data.stream import FileImages, center_crop, default_resize, eval_transform, random_resized_box, resize_shorter, sample_seed
from common.errors import ConfigError, DataError
from common.layers.tables import layer_shapes
from common.models import create_model
from common.profile import runner as profile
from common.profile.stats import ensure_quality
from common.report import runner as report
from tests.fakedata import make_imagenet
from tests.stages import ENV, ROOT, Killed, kill_at_evaluation, one_error_line, run_stage

pytestmark = pytest.mark.stages  # trains and profiles in-process

WNIDS = ("n01440764", "n01443537", "n01484850")
SIZE = 32  # the crop: ImageNet's 224 at test size


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root, WNIDS, n_train_per_class=8, n_val_per_class=2, sides=(36, 60))
    return root


def streamed(root: Path, **settings) -> DatasetConfig:
    return DatasetConfig(name="imagenet", root=str(root), image_size=SIZE, **settings)


# ----------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_the_shorter_side_then_crops_the_centre():
    image = torch.arange(3 * 40 * 60, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 40, 60)
    resized = resize_shorter(image, 20)
    assert resized.shape == (3, 20, 30)  # aspect kept
    crop = center_crop(resized, 16)
    assert crop.shape == (3, 16, 16) and torch.equal(crop, resized[:, 2:18, 7:23])
    assert eval_transform(image, 16, 20).shape == (3, 16, 16)
    assert default_resize(224) == 256  # ImageNet's 0.875


def test_random_resized_crop_boxes_lie_inside_and_follow_the_seed():
    boxes = [random_resized_box(50, 80, torch.Generator().manual_seed(s)) for s in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80 and h > 0 and w > 0
    areas = torch.tensor([h * w / (50 * 80) for _, _, h, w in boxes])
    assert areas.min() < 0.3 and areas.max() > 0.7  # scale 0.08-1 is drawn, not fixed
    assert boxes[3] == random_resized_box(50, 80, torch.Generator().manual_seed(3))
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(0, 2, 5) != sample_seed(1, 1, 5)


# ----------------------------------------------------------------------------- the dataset


def test_imagenet_is_streamed_from_its_file_index(imagenet):
    data = load_data(streamed(imagenet))
    assert data.streamed and isinstance(data.train.images, FileImages)
    assert data.num_classes == 3 and data.class_names == sorted(WNIDS)  # torchvision's sorted-wnid order
    assert tuple(data.train.images.shape) == (24, 3, SIZE, SIZE) and len(data.test) == 6
    assert data.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])  # what ImageNet teachers were trained with
    batch = data.train.images[torch.tensor([0, 9, 23])]
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(batch[1], data.train.images[9])
    assert torch.equal(data.train.images.take(torch.tensor([9]))[0], batch[1])  # a view decodes the same file
    # training crops depend on (seed, epoch, position) only
    assert torch.equal(data.train.images.load(4, seed=7), data.train.images.load(4, seed=7))


def test_the_fingerprint_comes_from_the_file_index_and_the_transforms(imagenet, tmp_path):
    base = load_data(streamed(imagenet)).fingerprint
    assert load_data(streamed(imagenet)).fingerprint == base
    assert load_data(streamed(imagenet, resize=40)).fingerprint != base  # another transform
    copy = tmp_path / "copy"
    shutil.copytree(imagenet, copy)
    assert load_data(streamed(copy)).fingerprint == base  # the content, not the path
    victim = next((copy / "train" / WNIDS[0]).iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # a file of another size
    assert load_data(streamed(copy)).fingerprint != base


def test_streamed_and_in_ram_paths_give_the_same_quality(tmp_path):
    """The same folder of square images, read into RAM and streamed with a no-op resize and the
    same normalisation: the same pixels, so the same S/I/E/Q."""
    root = tmp_path / "square"
    make_imagenet(root, WNIDS, n_train_per_class=12, n_val_per_class=2, sides=(SIZE, SIZE))
    common = [f"dataset.root={root}", "dataset.name=image_folder", f"dataset.image_size={SIZE}", "dataset.mean_std=imagenet",
              f"artifacts={tmp_path / 'artifacts'}", "teacher.name=tv:resnet18", "profile.subset_size=30", "profile.per_class_cap=6",
              "profile.batch_size=16", "profile.progress=false"]
    tables = []
    for extra in (["dataset.stream=false"], ["dataset.stream=true", f"dataset.resize={SIZE}", "dataset.workers=2"]):
        cfg = load_config(None, [*common, *extra])
        data = load_data(cfg.dataset)
        tables.append((data, cfg))
    (ram, ram_cfg), (files, files_cfg) = tables
    assert not ram.streamed and files.streamed
    assert torch.equal(files.train.images[torch.arange(len(files.train))], ram.train.images)
    torch.manual_seed(0)
    teacher = create_model("tv:resnet18", num_classes=3, in_channels=3, image_size=SIZE).eval()
    assert layer_shapes(ram_cfg, ram) == layer_shapes(files_cfg, files)
    stats = [ensure_quality(c, d, teacher, "sha-of-a-random-teacher", torch.device("cpu")) for d, c in tables]
    columns = ["S", "I", "E", "Q"]
    pd.testing.assert_frame_equal(stats[0][columns], stats[1][columns], rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_an_undecodable_file_is_an_error_naming_it_or_is_skipped_and_counted(imagenet, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(imagenet, root)
    victim = sorted((root / "train" / WNIDS[1]).iterdir())[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    data = load_data(streamed(root))
    position = [str(data.train.images.index.path(i)) for i in range(len(data.train))].index(str(victim))
    with pytest.raises(DataError) as exc:
        data.train.images[torch.tensor([position])]
    assert str(victim) in str(exc.value) and "dataset.bad_images=skip" in str(exc.value)

    skipping = load_data(streamed(root, bad_images="skip"))
    # the same key: an artifact finished under `error` read no bad file, so `skip` finds it again
    assert skipping.fingerprint == data.fingerprint
    images = skipping.train.images
    got = images[torch.tensor([position])][0]
    assert torch.equal(got, images[position + 1])  # the next image of the same class stands in
    assert skipping.train.labels[position] == skipping.train.labels[position + 1]
    assert images.skipped == {str(victim)}


def test_a_val_class_absent_from_train_is_an_error(imagenet, tmp_path):
    root = tmp_path / "extra_class"
    shutil.copytree(imagenet, root)
    shutil.copytree(root / "val" / WNIDS[0], root / "val" / "n09999999")
    with pytest.raises(DataError, match="n09999999 is a class with no folder in"):
        load_data(streamed(root))


def test_an_empty_class_folder_is_an_error(imagenet, tmp_path):
    root = tmp_path / "empty_class"
    shutil.copytree(imagenet, root)
    (root / "train" / "n00000001").mkdir()
    with pytest.raises(DataError, match="n00000001 holds no image files"):
        load_data(streamed(root))


def test_streaming_settings_that_cannot_hold_are_config_errors(imagenet):
    with pytest.raises(ConfigError, match="imagenet is always streamed"):
        load_data(streamed(imagenet, stream=False))
    with pytest.raises(ConfigError, match="mean_std=dataset"):
        load_data(streamed(imagenet, mean_std="dataset"))
    for bad in ("dataset.stream=maybe", "dataset.bad_images=ignore", "dataset.workers=0", "dataset.mean_std=cifar"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- training and the stages


def stream_overrides(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "dataset.name=imagenet", f"dataset.root={root}", f"dataset.image_size={SIZE}", "dataset.workers=2",
        f"artifacts={tmp / 'artifacts'}", "teacher.name=tv:resnet18", "student.name=tv:resnet18",
        "profile.subset_size=6", "profile.per_class_cap=4", "profile.batch_size=8", "profile.progress=false",
        "train.epochs=2", "train.batch_size=6", "train.augment=true", "train.progress=false", "train.tracker=none",
        "teacher_train.progress=false", "teacher_train.tracker=none", *extra,
    ]


@pytest.fixture(scope="module")
def as_is_teacher(imagenet, tmp_path_factory) -> Path:
    """A random tv:resnet18 with the dataset's classes saved as a torchvision state dict."""
    path = tmp_path_factory.mktemp("teacher") / "resnet18_imagenet.pth"
    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", num_classes=len(WNIDS), in_channels=3, image_size=SIZE).state_dict(), path)
    return path


def test_stage_1_2_3_end_to_end_with_a_torchvision_teacher_as_it_is(imagenet, as_is_teacher, tmp_path):
    overrides = stream_overrides(imagenet, tmp_path, f"teacher.pretrained={as_is_teacher}", "teacher.finetune=false", "profile.k=4")
    cfg = load_config(None, overrides)
    data = load_data(cfg.dataset)
    prof = profile.run(cfg, data)
    teacher_metrics = pd.read_csv(prof.dir.parent / "metrics.csv")
    assert list(teacher_metrics["epoch"]) == [0] and 0 <= teacher_metrics["test_acc"].iloc[0] <= 100  # evaluated on val, never trained
    assert prof.features is None and prof.manifest.features is None  # no cache unless asked for
    assert len(prof.selected) == 4 and len(prof.quality) == len(layer_shapes(cfg, data))
    runs = {m: distill.run(load_config(None, [*overrides, f"method.name={m}"]), seeds=[0])[0] for m in ("ours", "kd")}
    for method, result in runs.items():
        metrics = pd.read_csv(result.dir / "metrics.csv")
        assert (result.dir / "done").exists() and list(metrics["epoch"]) == [1, 2], method
        assert metrics["train_loss"].notna().all()
    out = report.run(Path(cfg.artifacts), tmp_path / "reports")
    assert set(out["accuracy"]["method"]) >= {"ours", "kd", "teacher"}


def test_a_run_resumed_with_loader_workers_ends_with_the_uninterrupted_metrics(imagenet, as_is_teacher, tmp_path, monkeypatch):
    """Augmentation drawn in two worker processes; the run is stopped in epoch 2 and rerun."""
    cfg = load_config(None, stream_overrides(imagenet, tmp_path, f"teacher.pretrained={as_is_teacher}", "method.name=kd"))
    whole = distill.run(cfg, seeds=[0])[0].dir
    reference = pd.read_csv(whole / "metrics.csv")
    shutil.rmtree(whole)
    calls = kill_at_evaluation(monkeypatch, 2)  # epoch 2's test evaluation: epoch 1's checkpoint is on disk
    with pytest.raises(Killed):
        distill.run(cfg, seeds=[0])
    assert torch.load(whole / "checkpoint.pt", weights_only=False)["epoch"] == 1
    distill.run(cfg, seeds=[0])
    resumed = pd.read_csv(whole / "metrics.csv")
    timing = ["epoch_time_s", "images_per_s", "elapsed_s"]
    assert calls[0] == 3 and list(resumed["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), reference.drop(columns=timing), check_exact=True)


def test_a_streamed_run_on_two_torchrun_ranks_finishes(imagenet, as_is_teacher, tmp_path):
    """torchrun with 2 gloo ranks on the CPU, each with its own 2-worker loader for its shard."""
    args = [a for a in stream_overrides(imagenet, tmp_path, f"teacher.pretrained={as_is_teacher}", "method.name=kd", "train.epochs=1", "train.batch_size=12")]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "stage2_distill.py"), *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (done,) = list((tmp_path / "artifacts").glob("imagenet/*/kd-*/seed0/done"))
    metrics = pd.read_csv(done.parent / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and metrics["train_loss"].notna().all()
    run = yaml.safe_load((done.parent / "config.yaml").read_text())["run"]
    assert run["ranks"] == 2


def test_a_cache_of_a_streamed_dataset_is_written_only_when_asked_for_and_its_size_logged_first(imagenet, as_is_teacher, tmp_path, caplog):
    overrides = stream_overrides(imagenet, tmp_path, f"teacher.pretrained={as_is_teacher}", "train.augment=false", "train.teacher_source=cache")
    cfg = load_config(None, overrides)
    data = load_data(cfg.dataset)
    with caplog.at_level("INFO", logger="kd"):
        prof = profile.run(cfg, data)
    assert prof.features is not None and prof.features.exists() and prof.manifest.features == prof.features
    lines = [r.getMessage() for r in caplog.records]
    size = next(i for i, line in enumerate(lines) if line.startswith(f"profile: writing {prof.features}:"))
    wrote = next(i for i, line in enumerate(lines) if line.startswith("profile: wrote layers"))
    assert size < wrote and f"{len(data.train_indices)} rows x" in lines[size] and " GB (" in lines[size]


def test_a_corrupt_training_jpeg_stops_stage_2_with_one_error_line_naming_it(imagenet, tmp_path):
    """Decoded in a loader worker process, reported by the stage as one line, no traceback."""
    root = tmp_path / "corrupt"
    shutil.copytree(imagenet, root)
    victim = sorted((root / "train" / WNIDS[2]).iterdir())[1]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    args = [a for a in stream_overrides(root, tmp_path, "method.name=ce", "train.epochs=1") if not a.startswith("train.progress")]
    line = one_error_line(run_stage("s2", args))
    assert str(victim) in line and "remove or replace the file" in line


def test_a_bad_file_dealt_with_by_skip_keeps_finished_work_and_is_counted_per_split(imagenet, as_is_teacher, tmp_path, caplog):
    """A truncated training JPEG stops stage 1 after the as-is teacher was evaluated. With
    dataset.bad_images=skip the same teacher directory is found (not evaluated again) and the
    profile finishes. A test file damaged later (in place: same name and size) is replaced at
    every evaluation, counted per split and epoch in metrics.csv and in stage 3's report, and
    warned about once."""
    root = tmp_path / "bad"
    shutil.copytree(imagenet, root)
    bad_train = sorted((root / "train" / WNIDS[0]).iterdir())[3]
    bad_train.write_bytes(bad_train.read_bytes()[: bad_train.stat().st_size // 2])
    common = stream_overrides(  # subset B: every training image (8 per class)
        root, tmp_path, f"teacher.pretrained={as_is_teacher}", "train.augment=false", "train.batch_size=6", "profile.per_class_cap=8"
    )
    cfg = load_config(None, common)
    with pytest.raises(DataError, match="bad_images=skip"):
        profile.run(cfg, load_data(cfg.dataset))
    tdir = next((tmp_path / "artifacts" / "imagenet").glob(dir_name("tv:resnet18") + "-*"))  # the portable directory name
    evaluated = (tdir / "metrics.csv").stat().st_mtime_ns
    assert (tdir / "done").exists()

    skip = load_config(None, [*common, "dataset.bad_images=skip", "profile.log_interval_s=1e-9"])  # stderr is no terminal here
    caplog.set_level("INFO", logger="kd")
    prof = profile.run(skip, load_data(skip.dataset))
    assert prof.dir.parent == tdir and (tdir / "metrics.csv").stat().st_mtime_ns == evaluated  # found, not evaluated again
    assert any(r.getMessage().startswith("profile S/I/E/Q: images forwarded ") for r in caplog.records)  # progress lines, runtime only

    bad_test = sorted((root / "val" / WNIDS[2]).iterdir())[0]
    bad_test.write_bytes(b"\0" * bad_test.stat().st_size)  # damaged in place: same index, same keys
    caplog.clear()  # stage 1 warned about the training file in its own process
    (run,) = distill.run(load_config(None, [*common, "dataset.bad_images=skip", "method.name=kd"]), seeds=[0])
    metrics = pd.read_csv(run.dir / "metrics.csv")
    assert list(metrics["skipped_train"]) == [1, 1] and list(metrics["skipped_test"]) == [1, 1]  # 24 rows, 4 batches of 6: all read
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped")]
    assert sorted(warned) == sorted(f"data: skipped {f} (cannot decode it; dataset.bad_images=skip), using the next image of its class" for f in (bad_train, bad_test))
    out = report.run(Path(skip.artifacts), tmp_path / "reports")
    assert "replaced_images" in out["markdown"] and "| imagenet | student |" in out["markdown"]["replaced_images"]
    assert (tmp_path / "reports" / "replaced_images.md").is_file()


@pytest.mark.parametrize("config", ["imagenet.yaml", "imagenet_kd_benchmark.yaml"])
def test_the_imagenet_configs_on_a_small_folder_name_the_setting_that_does_not_fit(imagenet, tmp_path, config):
    """An Imagenette-size folder (10 classes x ~1 000 images) cannot give profile.pool_size=50000's
    5 000 images per class; the same holds at test size (3 classes x 8, batches lowered to fit),
    and the error names profile.pool_size, not the training subsets it used to name."""
    from common.checks import load_data_checked

    small = [f"dataset.root={imagenet}", f"artifacts={tmp_path}", f"dataset.image_size={SIZE}", "train.batch_size=6", "teacher_train.batch_size=6"]
    cfg = load_config(ROOT / "configs" / config, small)
    with pytest.raises(ConfigError, match=r"^profile.pool_size=50000 asks for 16666 images per class.*set profile.pool_size between 3 and 24"):
        load_data_checked(cfg)
    assert not (tmp_path / "imagenet").exists()  # nothing written
