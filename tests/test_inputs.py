"""The two input paths of the training loop (common/train/inputs.py) hand every step the same
batch, in the loop's order, so a run's numbers do not depend on the path."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch

from common.train import inputs

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


@pytest.mark.stages
def test_a_run_has_the_same_metrics_on_either_path(tmp_path_factory):
    from common import distill
    from tests.test_pipeline import tiny_config

    tmp = tmp_path_factory.mktemp("inputs")
    results = {}
    for path in ("resident", "prefetch"):
        cfg = tiny_config(tmp / path, "method.name=ours", f"train.input_path={path}")  # a tree each
        result = distill.run(cfg, seeds=[0])[0]
        relative = result.dir.relative_to(cfg.artifacts)
        results[path] = (relative, pd.read_csv(result.dir / "metrics.csv").drop(columns=TIMING, errors="ignore"))
    (dir_a, a), (dir_b, b) = results["resident"], results["prefetch"]
    assert dir_a == dir_b  # where the images live is not part of the run's identity
    pd.testing.assert_frame_equal(a, b)
