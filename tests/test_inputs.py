"""The two input paths of the training loop (common/train/inputs.py) hand every step the same
batch, in the loop's order, for the images and the cached teacher features alike, so a run's
numbers do not depend on the path."""
from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch

from common.cache.reader import FeatureCache, storage_order
from common.cache.write import write_h5
from common.train import inputs, teacher_source
from common.train.teacher_source import CachedTeacher

CPU = torch.device("cpu")
TIMING = ["epoch_time_s", "elapsed_s", "images_per_s"]


def _images(n: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _batches() -> list[torch.Tensor]:
    order = torch.randperm(30, generator=torch.Generator().manual_seed(1)) + 5  # rows 5..34
    return list(order.split(8))


@pytest.mark.parametrize("source", ["resident", "prefetch"])
def test_each_path_yields_exactly_the_batches_in_order(source):
    images = _images()
    rows = torch.arange(5, 35)
    made = inputs.images_on_device(images, rows, CPU, mode=source)
    assert isinstance(made, inputs.ResidentImages if source == "resident" else inputs.PrefetchedImages)
    got = list(made.epoch(_batches()))
    assert len(got) == len(_batches())
    for (rows, batch), idx in zip(got, _batches()):
        assert torch.equal(rows, idx) and rows.device == CPU  # the step's one device copy of its rows
        assert torch.equal(batch, images[idx])


def test_auto_is_resident_on_the_cpu_and_copies_nothing():
    images = _images()
    assert inputs.choose_mode("auto", 10**12, CPU) == "resident"  # whatever the size: RAM is where the step reads
    made = inputs.images_on_device(images, torch.arange(40), CPU)
    assert made.images.data_ptr() == images.data_ptr()


def test_prefetch_raises_the_gather_error_and_stops_cleanly_when_left_early():
    images = _images()
    bad = [torch.tensor([0, 1]), torch.tensor([999])]  # the second gather fails in the thread
    with pytest.raises(IndexError):
        list(inputs.PrefetchedImages(images, CPU).epoch(bad))
    many = [torch.tensor([i % 40]) for i in range(200)]
    epoch = inputs.PrefetchedImages(images, CPU).epoch(many)
    assert [b.tolist() for _, b in itertools.islice(epoch, 3)] == [images[[0]].tolist(), images[[1]].tolist(), images[[2]].tolist()]
    epoch.close()  # a stop mid-epoch (NaN, Ctrl-C) must not leave the producer blocked forever


# ----------------------------------------------------------------------------- cached teacher features

PLACEMENTS = ["read in the step", "device copy", "prefetch"]


def _place(monkeypatch: pytest.MonkeyPatch, placement: str) -> str:
    """train.input_path for `placement`; "device copy" runs the CUDA resident path on the CPU."""
    if placement == "device copy":
        monkeypatch.setattr(teacher_source, "_copies_to_device", lambda device: True)
    return "prefetch" if placement == "prefetch" else "resident"


def _feature_cache(path: Path) -> Path:
    """A cache of the even training positions 0..398, one float16 layer and float32 logits."""
    positions = storage_order(torch.arange(0, 400, 2))
    features = torch.randn(len(positions), 3, 2, generator=torch.Generator().manual_seed(2))
    write_h5(path, {}, len(positions), {"positions": (), "layer_5": (3, 2), "logits": (4,)},
             {"positions": "int64", "layer_5": "float16", "logits": "float32"},
             [{"positions": positions, "layer_5": features, "logits": features.flatten(1)[:, :4]}])
    return path


@pytest.mark.parametrize("in_ram", [True, False])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_hands_the_step_the_rows_the_cache_gives(tmp_path, monkeypatch, placement, in_ram):
    mode = _place(monkeypatch, placement)
    train_rows = torch.arange(0, 200, 2)  # the run's rows: part of the cache
    with FeatureCache(_feature_cache(tmp_path / "features.h5")) as cache:
        source = CachedTeacher(cache, [5], True, CPU, (1 << 30) if in_ram else 0, rows=train_rows, input_path=mode)
        assert source.mode == mode and (source._resident is not None) == (placement == "device copy")
        for epoch in range(2):
            batches = source.batch_order(train_rows, 8, torch.Generator().manual_seed(epoch))
            for b in batches:
                feats, logits = source.batch(b, torch.empty(0))
                assert feats[5].dtype == torch.float32  # widened from the stored float16, as `gather` gives it
                assert torch.equal(feats[5], cache.gather("layer_5", b)) and torch.equal(logits, cache.gather("logits", b))
        odd = torch.tensor([4, 0, 4])  # a batch of no batch_order: checked and gathered by itself
        assert torch.equal(source.batch(odd, torch.empty(0))[0][5], cache.gather("layer_5", odd))


def test_prefetched_features_stop_their_thread_when_an_epoch_is_left_early(tmp_path):
    train_rows = torch.arange(0, 200, 2)
    with FeatureCache(_feature_cache(tmp_path / "features.h5")) as cache:
        source = CachedTeacher(cache, [5], False, CPU, 1 << 30, rows=train_rows, input_path="prefetch")
        batches = source.batch_order(train_rows, 2, torch.Generator().manual_seed(0))  # 50 batches, 2 ahead
        source.batch(batches[0], torch.empty(0))
        assert any(t.name == "kd-prefetch" for t in threading.enumerate())
        again = source.batch_order(train_rows, 2, torch.Generator().manual_seed(1))  # the next epoch (a NaN stop, a resume)
        assert torch.equal(source.batch(again[0], torch.empty(0))[0][5], cache.gather("layer_5", again[0]))
        source._stop_prefetch()
        assert not any(t.name == "kd-prefetch" for t in threading.enumerate())


def test_images_and_features_share_one_device_budget(monkeypatch):
    """auto on a GPU (free memory faked): the images are counted first, the features get the
    rest, and the images, placed after them, still fit in what is then free."""
    cuda = torch.device("cuda")
    free = [100]
    monkeypatch.setattr(inputs, "free_device_bytes", lambda device: free[0])
    assert inputs.features_mode("auto", 40, 10, cuda) == "resident"  # 10 + 40 = the budget, half of 100
    assert inputs.features_mode("auto", 41, 10, cuda) == "prefetch"
    assert inputs.features_mode("auto", 50, 60, cuda) == "resident"  # images past the budget hold nothing: all of it
    free[0] -= 40  # the features went first
    assert inputs.choose_mode("auto", 10, cuda) == "resident"
    assert inputs.features_mode("prefetch", 1, 0, cuda) == "prefetch" and inputs.features_mode("resident", 10**12, 0, cuda) == "resident"
    assert inputs.features_mode("auto", 10**12, 10**12, CPU) == "resident"  # on the CPU: the RAM copy or the file, as before


@pytest.mark.stages
def test_a_run_has_the_same_metrics_on_every_path(tmp_path_factory, monkeypatch):
    """`ours` from the cache: images and features read in the step as before (the CPU's
    resident path), the features in a device copy (the CUDA resident path, run on the CPU), and
    both prefetched: the same metrics, the same run directory."""
    from common import distill
    from tests.test_pipeline import tiny_config

    tmp = tmp_path_factory.mktemp("inputs")
    results = {}
    used: dict[str, int] = {"device copy": 0, "prefetch": 0}
    real_gather, real_stored = teacher_source.ResidentFeatures.gather, CachedTeacher._stored_rows

    def gather(self, index):
        used["device copy"] += 1
        return real_gather(self, index)

    def stored(self, rows):
        used["prefetch"] += 1
        return real_stored(self, rows)

    monkeypatch.setattr(teacher_source.ResidentFeatures, "gather", gather)
    monkeypatch.setattr(CachedTeacher, "_stored_rows", stored)
    for placement in PLACEMENTS:
        with monkeypatch.context() as mp:
            path = _place(mp, placement)
            cfg = tiny_config(tmp / placement.replace(" ", "_"), "method.name=ours", f"train.input_path={path}")  # a tree each
            result = distill.run(cfg, seeds=[0])[0]
        relative = result.dir.relative_to(cfg.artifacts)
        results[placement] = (relative, pd.read_csv(result.dir / "metrics.csv").drop(columns=TIMING, errors="ignore"))
    steps = 2 * (200 // 32)  # 2 epochs of the tiny run's 200 images in batches of 32
    assert used == {"device copy": steps, "prefetch": steps}  # each path really served its run
    (dir_a, a) = results["read in the step"]
    for placement in PLACEMENTS[1:]:
        dir_b, b = results[placement]
        assert dir_a == dir_b  # where the inputs live is not part of the run's identity
        pd.testing.assert_frame_equal(a, b, obj=placement)
