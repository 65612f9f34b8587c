"""No host sync inside the training step (issue 19 item 2): a test that fails when one comes back.

On a GPU every read of a device value by the host (`.item()`, `float(t)`, `int(t)`, `bool(t)`,
`if tensor:`) waits for the queue to drain. On the CPU there is nothing to wait for, but the read
still passes through `aten._local_scalar_dense`, so a TorchDispatchMode that counts that op finds
every such read on any machine (issue 19's definition). The counter here also counts the other
reads that wait on a GPU: many values at once (`Tensor.tolist`, `Tensor.numpy`) and ops whose
output size depends on the values (`nonzero`, boolean masks, `unique`). On the CPU it cannot tell
a host tensor from a device one, so it counts reads of host tensors too (stricter than a GPU).
torch.optim's own step counters are left out: they live on the host (a CPU tensor even on a
GPU run), so reading them never waits for the device.

Steady state is a 4-epoch run minus a 2-epoch run (evaluation included), per training step of
the two extra epochs: setup, stage 1 and the first epochs cancel out. What stays is per epoch
(the NaN flag with the weight check, the epoch's sums, the cache's presence check, each
evaluation: one read each) and one per `NAN_CHECK_EVERY` steps; a read per step, or per batch
and layer, would add 1 or more.

bench/bench_syncs.py uses these helpers at its own size and prints where each read comes from.
"""
from __future__ import annotations

import collections
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
SYNC_GOAL = 0.1  # issue 19: host syncs per training step in steady state
_OPTIM = f"{Path(torch.optim.__file__).parent}/"  # torch.optim's own (host) step counters


_SCALAR = torch.ops.aten._local_scalar_dense.default  # .item(), float(t), int(t), bool(t), `if t:`
_SIZED_BY_VALUES = {  # their output's size is known only once the values are
    torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default,
}
_MANY_VALUES = {torch.Tensor.tolist, torch.Tensor.numpy}


class _Reads(TorchDispatchMode):
    """The aten-level host reads, for HostSyncCounter."""

    def __init__(self, where: collections.Counter[str]) -> None:
        super().__init__()
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR or func in _SIZED_BY_VALUES or (func is torch.ops.aten.index.Tensor and _bool_mask(args)):
            _count(self.where, "" if func is _SCALAR else f" ({func.__name__})")
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of tensor values outside torch.optim (module docstring), by the project
    line that asked for each (`where`: "path:line", the innermost frame under ROOT; other kinds
    than issue 19's `_local_scalar_dense` carry their name, e.g. "path:line (tolist)")."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()
        self._reads = _Reads(self.where)

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._reads.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MANY_VALUES:
            _count(self.where, f" ({func.__name__})")
        return func(*args, **(kwargs or {}))


def _bool_mask(args) -> bool:
    return any(i is not None and i.dtype == torch.bool for i in args[1])


def _count(where: collections.Counter[str], kind: str) -> None:
    site = _caller()
    if site is not None:
        where[site + kind] += 1


def _caller() -> str | None:
    """The innermost project frame of this read, or None when torch.optim made it."""
    frame = sys._getframe(3)
    site = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OPTIM):
            return None
        if site is None and name.startswith(str(ROOT)) and "/.venv/" not in name and not name.endswith("test_syncs.py"):
            site = f"{Path(name).relative_to(ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return site or "<torch>"


@dataclass
class SteadyState:
    per_step: float  # host syncs per training step, (long run - short run) / its extra steps
    steps: int  # the extra steps
    where: collections.Counter[str]  # long run's syncs minus the short run's, by project line


def steady_state(run: Callable[[int], int], short: int = 2, long: int = 4) -> SteadyState:
    """Syncs per step between a `short`- and a `long`-epoch run; `run(epochs)` trains a fresh run
    and returns its steps per epoch."""
    counts = {}
    for epochs in (short, long):
        with HostSyncCounter() as counter:
            steps_per_epoch = run(epochs)
        counts[epochs] = counter.where
    extra = counts[long].copy()
    extra.subtract(counts[short])
    # A line read more often in the short run did one-off work there (a first run extends the
    # feature cache by the layers its method reads): the difference would hide per-step reads.
    one_off = {site: -n for site, n in extra.items() if n < 0}
    assert not one_off, f"the {short}-epoch run read more than the {long}-epoch run at {one_off}: warm up first (stage2_runner does)"
    steps = (long - short) * steps_per_epoch
    return SteadyState(per_step=sum(extra.values()) / steps, steps=steps, where=+extra)


def stage2_runner(overrides: list[str]) -> Callable[[int], int]:
    """`run(epochs)` for `steady_state`: one stage-2 run (common.distill.run, the project's loop)
    of `epochs` epochs, restarted each time, beside the shared stage-1 tree. That tree is built,
    and a 1-epoch run made, when this is called (outside any count): a method's first run
    extends the feature cache by the layers it reads (crd's penultimate one), once."""
    from common import distill
    from common.config import load_config
    from common.data.registry import load_data
    from common.profile import runner as profile

    quiet = ["train.progress=false", "teacher_train.progress=false", "profile.progress=false"]
    cfg = load_config(None, [*overrides, *quiet])
    data = load_data(cfg.dataset)
    profile.run(cfg, data)

    def run(epochs: int) -> int:
        run_cfg = load_config(None, [*overrides, *quiet, f"train.epochs={epochs}"])
        result = distill.run(run_cfg, seeds=[0], restart=True)[0]
        rows = data.training_subset(run_cfg.train.train_subset, run_cfg.dataset.split_seed)
        assert (result.dir / "done").exists()
        return len(rows) // run_cfg.train.batch_size

    run(1)
    return run


def tiny_overrides(tmp: Path, n_train: int, batch_size: int) -> list[str]:
    """The tiny Fashion-MNIST stand-in of the other stage tests, with many small steps per epoch."""
    from tests.fakedata import make_fashion_mnist

    root = tmp / "fmnist"
    if not root.exists():
        make_fashion_mnist(root, n_train=n_train, n_test=60, seed=0)
    return [
        f"dataset.root={root}", f"artifacts={tmp / 'artifacts'}",
        "teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125",
        "teacher_train.epochs=1", "teacher_train.batch_size=32", f"train.batch_size={batch_size}",
        "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=50",
    ]


class _Linear(torch.nn.Module):
    """A Trainable small enough to be nearly machine-independent: BatchNorm + Linear on pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(28 * 28), torch.nn.Linear(28 * 28, 10))

    def forward(self, x, y, feats, logits, step=None):
        out = self.body(x)
        return out, {"ce": torch.nn.functional.cross_entropy(out, y), "l2": 1e-3 * out.square().mean()}

    def forward_eval(self, x):
        return self.body(x)


METRIC_COLUMNS = ["train_loss", "loss_ce", "loss_l2", "train_acc", "test_acc", "lr"]


def linear_fit(tmp: Path, model: torch.nn.Module | None = None) -> Path:
    """A 3-epoch `fit` of `_Linear` (or `model`), 75 steps an epoch; its run directory."""
    from common.config import load_config
    from common.data.registry import load_data
    from common.train.loop import fit
    from tests.fakedata import make_fashion_mnist

    if not (tmp / "fmnist").exists():
        make_fashion_mnist(tmp / "fmnist", n_train=300, n_test=60, seed=0)
    cfg = load_config(None, [f"dataset.root={tmp / 'fmnist'}", "train.epochs=3", "train.batch_size=4", "train.progress=false", "train.tracker=none"])
    data = load_data(cfg.dataset)
    torch.manual_seed(0)
    fit(model or _Linear(), data, cfg.train, tmp / "run", lr=0.01, train_indices=data.train_indices)
    return tmp / "run"


def linear_fit_metrics(tmp: Path) -> dict[str, list[float]]:
    """metrics.csv of `linear_fit`, by column."""
    import pandas as pd

    metrics = pd.read_csv(linear_fit(tmp) / "metrics.csv")
    return {c: metrics[c].tolist() for c in METRIC_COLUMNS}


# tests/test_syncs.py's linear_fit_metrics, run by the loop before the NaN flag (commit 10afa26,
# which read the loss on the host every step) on one CPU thread.
BEFORE_THE_FLAG: dict[str, list[float]] = {
    "train_loss": [2.6407901655219033, 1.3594680746799956, 0.3712576143505673],
    "loss_ce": [2.640081850687663, 1.3524479174117248, 0.36086057758579654],
    "loss_l2": [0.0007083148342402031, 0.00702015726827085, 0.010397036764770747],
    "train_acc": [10.666666666666666, 57.0, 90.0],
    "test_acc": [5.0, 8.333333333333334, 8.333333333333334],
    "lr": [0.009928307429420745, 0.0045269981220823945, 1.0346321688376769e-06],
}


def test_healthy_metrics_are_those_of_the_loop_before_the_flag(tmp_path):
    """The NaN flag and the fused weight check change no number of a healthy run.

    They are bit-identical on the CPU that recorded them; the tolerance is for another CPU's
    kernels, far below what one step more or less, or a skipped update, would change.
    """
    now = linear_fit_metrics(tmp_path)
    for column in METRIC_COLUMNS:
        assert now[column] == pytest.approx(BEFORE_THE_FLAG[column], rel=1e-6), column


class _Poisoned(_Linear):
    """`_Linear` whose CE term is NaN at one step (counted over the whole run, 1-based)."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step, self.steps = bad_step, 0

    def forward(self, x, y, feats, logits, step=None):
        self.steps += 1
        out, losses = super().forward(x, y, feats, logits, step)
        if self.steps == self.bad_step:  # one bad step; the NaN weights it leaves make the later ones bad too
            losses["ce"] = losses["ce"] * math.nan
        return out, losses


@pytest.mark.parametrize(
    "bad_step, where, kept",
    [
        (3, "epoch 1, step 3 of 75", "no epoch finished"),  # found at the read after step 50
        (75 + 62, "epoch 2, step 62 of 75", "the last good checkpoint, epoch 1, is kept"),  # found at the epoch's end
        (75 + 50, "epoch 2, step 50 of 75", "the last good checkpoint, epoch 1, is kept"),  # the step of a read
    ],
)
def test_the_nan_stop_names_the_first_bad_step_read_later(tmp_path, bad_step, where, kept):
    from common.errors import TrainingError

    with pytest.raises(TrainingError) as caught:
        linear_fit(tmp_path, _Poisoned(bad_step))
    message = str(caught.value)
    assert re.search(rf"loss is not finite at {where} \(loss_ce=nan, loss_l2=\d[^,)]*\); {kept}", message), message
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if bad_step > 75:  # epoch 1's checkpoint, never one written after the bad step
        saved = torch.load(checkpoint, weights_only=False)
        assert saved["epoch"] == 1 and all(bool(v.isfinite().all()) for v in saved["model"].values() if v.is_floating_point())
    else:
        assert not checkpoint.exists()


@pytest.mark.parametrize("in_ram", [True, False])
def test_the_cached_teacher_checks_an_epochs_rows_once(tmp_path, in_ram):
    """A missing row is an error of the epoch's `batch_order`, before its first step; the epoch's
    batches are then gathered with no host read (from RAM), and give the rows `gather` gives."""
    from common.cache.reader import FeatureCache, storage_order
    from common.cache.write import write_h5
    from common.errors import CacheError
    from common.train.teacher_source import CachedTeacher

    positions = storage_order(torch.arange(0, 400, 2))  # the cache holds the even training positions
    path = tmp_path / "features.h5"
    features = torch.randn(len(positions), 3, 2)
    write_h5(path, {}, len(positions), {"positions": (), "layer_5": (3, 2), "logits": (4,)},
             {"positions": "int64", "layer_5": "float16", "logits": "float32"},
             [{"positions": positions, "layer_5": features, "logits": features.flatten(1)[:, :4]}])
    train_rows = torch.arange(0, 200, 2)  # RAM holds only these when they fit
    with FeatureCache(path) as cache:
        source = CachedTeacher(cache, [5], True, torch.device("cpu"), (1 << 30) if in_ram else 0, rows=train_rows)
        assert source.from_disk != in_ram
        batches = source.batch_order(train_rows, 8, torch.Generator().manual_seed(0))
        with HostSyncCounter() as counter:
            got = [source.batch(b, torch.empty(0)) for b in batches]
        if in_ram:
            assert counter.count == 0, dict(counter.where)
        for b, (feats, logits) in zip(batches, got):
            assert torch.equal(feats[5], cache.gather("layer_5", b)) and torch.equal(logits, cache.gather("logits", b))
        with pytest.raises(CacheError, match="no row for training position 3 "):
            source.batch_order(torch.tensor([0, 2, 3, 4]), 2, torch.Generator().manual_seed(0))
        if in_ram:  # a row of the file that RAM does not hold
            with pytest.raises(IndexError, match="not loaded into RAM"):
                source.batch_order(torch.tensor([0, 2, 4, 300]), 2, torch.Generator().manual_seed(0))
        with pytest.raises(CacheError, match="no row for training position 3 "):  # a batch of no batch_order is checked itself
            source.batch(torch.tensor([0, 3]), torch.empty(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    # 400 images in batches of 4: 100 steps per epoch, so the per-epoch reads come to a few
    # hundredths per step and a per-step read (1.0) stands out.
    return tiny_overrides(tmp_path_factory.mktemp("syncs"), n_train=400, batch_size=4)


# crd with 64 negatives: each class's pool (about 360 of the 400 rows) is larger, so its batches
# take the draw without replacement, the one of CIFAR-size runs (16 384 of 49 500).
METHODS = {"ce": ["method.name=ce"], "ours": ["method.name=ours"], "crd": ["method.name=crd", "method.crd_negatives=64"]}


@pytest.mark.stages  # runs stage 1 and stage 2 in-process
@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_host_sync_per_training_step(tiny, method):
    result = steady_state(stage2_runner([*tiny, *METHODS[method], "train.teacher_source=auto"]))
    assert result.per_step <= SYNC_GOAL, f"{method}: {result.per_step:.3f} host syncs per step over {result.steps} steps: {dict(result.where)}"


class _Checked(_Linear):
    """`_Linear` with per-row state (as CRD's bank): records the rows the loop asks it to check."""

    def __init__(self) -> None:
        super().__init__()
        self.checked: list[torch.Tensor] = []

    def check_rows(self, rows: torch.Tensor) -> None:
        self.checked.append(rows.clone())


def test_the_loop_checks_a_methods_rows_once_at_setup(tmp_path):
    """The check that each batch row has a row in CRD's bank moved out of the step (a host read
    per step) to the loop's setup: once per run, for every row an epoch draws from."""
    model = _Checked()
    linear_fit(tmp_path, model)
    assert len(model.checked) == 1 and model.checked[0].device.type == "cpu"
    assert sorted(model.checked[0].tolist()) == list(range(300))  # the training rows, all of them


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(3)
    with HostSyncCounter() as counter:
        t.sum().item()
        float(t[0])
        int(t[1])
        bool(t.any())
        if t.all():
            pass
        assert counter.count == 5
        t.tolist()
        t.numpy()
        t.nonzero()
        t[t > 0]
        torch.unique(t)
        assert counter.count == 10
        t + 1, t.sum(), t[torch.tensor([0, 2])], t.cpu()  # no host read
        parameter = torch.nn.Parameter(t.clone())
        parameter.grad = torch.ones(3)
        torch.optim.AdamW([parameter], lr=0.1).step()  # its host step counter is left out
    assert counter.count == 10, dict(counter.where)
