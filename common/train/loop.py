"""The one training loop, shared by teachers, CE students and every distillation method.

AdamW + OneCycle stepped per batch (METHOD 5, 8.7; section 0 item 6: the scheduler gets the
number of steps actually taken), per-epoch evaluation on the whole test set (and the validation
split when there is one), a checkpoint every epoch, resume to the same result, NaN stop.

The loop knows nothing of any method: it calls the distiller (its forward_train) and sums the
losses. Under torchrun the same loop runs on every rank (common/train/distributed.py).

Device and seeding live in common/runtime.py, the optimizer and schedule in common/train/recipes.py.
One module at about 510 lines: setup, epoch, resume and checkpoint are the steps of one loop and
share its state (`_Loop`, `_Progress`); apart, each would take that state as arguments.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from common.artifacts import layout as artifacts
from common.cache.reader import epoch_batches
from common.train import distributed
from common.train import tracking
from common.config import TrainConfig
from common.train.recipes import make_optimizer, make_scheduler
from common.runtime import resolve_device
from common.data.registry import Data, augment_batch
from common.train.distributed import SINGLE, Ranks
from common.errors import ConfigError, TrainingError
from common.methods.base import Step
from common.train.compiled import compile_errors, compile_training_step
from common.train.inputs import ImageSource, images_on_device
from common.train.streamed import eval_batches
from common.data.stream import FileImages, select
from common.runtime import IntervalLine
from common.files import atomic_torch_save, atomic_write, atomic_write_text, atomic_write_yaml

log = logging.getLogger("kd")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
# Steps between the host's reads of the NaN flag (and of the progress bar's loss) inside an
# epoch; the epoch's end always reads it. Each read makes a GPU's queue drain, so it costs
# 1/50 = 0.02 host syncs per step (issue 19's goal: <= 0.1 in all), and a bad step stops the run
# at most 49 steps later: an eighth of a CIFAR epoch (390 batches of 128). Those steps change
# nothing that is kept (the epoch's checkpoint is written only after the read).
NAN_CHECK_EVERY = 50


class TeacherSource(Protocol):
    """Teacher knowledge for one batch: ({layer: feature}, logits or None)."""

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch's batches of `indices` in the order this source reads best (drop_last)."""
        ...

    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        ...


class Trainable(Protocol):
    """What the loop trains: a module called as model(images, labels, teacher features, teacher
    logits, step) -> (logits, {loss name: weighted scalar}) (a Distiller's forward_train; a call, so
    that DDP's hooks run), with `forward_eval` for test-time logits."""

    training: bool

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, teacher_features: dict[int, torch.Tensor], teacher_logits: torch.Tensor | None,
        step: Step,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...

    def forward_eval(self, images: torch.Tensor) -> torch.Tensor:
        ...

    def train(self, mode: bool = True) -> Any:
        ...

    def eval(self) -> Any:
        ...

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        ...


@dataclass
class FitResult:
    best_epoch: int
    best_test_acc: float
    last_test_acc: float
    epochs: int
    metrics: pd.DataFrame


@torch.no_grad()
def evaluate(
    model: Trainable, data: Data, images: torch.Tensor | FileImages, labels: torch.Tensor, device: torch.device, batch_size: int, amp: bool,
    ranks: Ranks = SINGLE, replaced: set[str] | None = None,
) -> float:
    """Top-1 accuracy in percent over every given image (section 0 item 6: the whole test set).

    Under torchrun each rank scores every world-th image with rank 0's buffers and the counts
    are summed, so the result is the one-process accuracy of the model rank 0 saves. A streamed
    split's files replaced on the way (dataset.bad_images=skip) go into `replaced` (this rank's).
    """
    was_training = model.training
    distributed.sync_buffers(model, ranks)
    model.eval()
    mine = torch.arange(ranks.rank, len(labels), ranks.world)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    batches = list(mine.split(batch_size))
    for batch, raw in zip(batches, eval_batches(images, batches, device, replaced)):
        x = data.normalize(raw, device)
        with _autocast(device, amp):
            logits = model.forward_eval(x)
        correct += (logits.argmax(1) == labels[batch].to(device, non_blocking=True)).sum()
    model.train(was_training)
    return 100.0 * int(distributed.sum_over_ranks(correct, ranks)) / max(1, len(labels))


def counts_skips(data: Data) -> bool:
    """Whether undecodable files are replaced (a streamed split with dataset.bad_images=skip):
    then metrics.csv counts them per split (skipped_train, skipped_val, skipped_test)."""
    images = data.train.images
    return isinstance(images, FileImages) and images.bad_images == "skip"


def _autocast(device: torch.device, amp: bool):
    # bfloat16 needs no loss scaling; on the CPU we stay in float32 so seeds fix results exactly.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@dataclass
class _Progress:
    """What a checkpoint carries besides the weights: metrics so far, the best epoch, time."""

    rows: list[dict[str, float]]
    best: dict[str, Any]
    elapsed: float
    epoch: int  # last finished epoch


@dataclass
class _Loop:
    """Everything one training run's epochs share, set up once by `fit`."""

    net: nn.Module  # what a step calls: `model`, or DDP around it
    compiled: str | None  # the torch.compile mode of `model`'s call (train.compile), None: eager
    model: nn.Module
    weights_of: nn.Module  # the part whose weights are saved
    data: Data
    cfg: TrainConfig
    rows: torch.Tensor  # this rank's training positions
    batch_size: int  # this rank's share of the batch
    teacher: TeacherSource | None
    images: ImageSource  # the training images on the device (common/train/inputs.py)
    labels: torch.Tensor  # every training label on the device (ImageNet's: 10 MB), gathered per step there
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp: bool
    ranks: Ranks
    run_dir: Path
    desc: str

    @property
    def has_val(self) -> bool:
        return len(self.data.val_indices) > 0


def fit(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    lr: float,
    train_indices: torch.Tensor,
    teacher: TeacherSource | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    weights_name: str = "student.pt",
    weights_of: nn.Module | None = None,
    desc: str = "",
    ranks: Ranks = SINGLE,
    run_config: dict[str, Any] | None = None,
) -> FitResult:
    """Train `model` (a Distiller: called as model(images, labels, teacher features, teacher
    logits), forward_eval) and write the run's artifacts.

    Writes metrics.csv and checkpoint.pt every epoch; at the end `weights_name` holding
    {"best": state, "last": state, "best_epoch": e} of `weights_of` (default: the whole model).
    "best" is the epoch of best validation accuracy when a validation split exists, else of best
    test accuracy (the paper's protocol, METHOD 10). A checkpoint found in `run_dir` is resumed.
    Under torchrun (`ranks`) each rank trains on its shard of `train_indices` and only rank 0 writes.
    Every epoch's row also goes to the tracker `cfg.tracker` (described by `run_config`).
    """
    loop = _setup(model, data, cfg, run_dir, lr, train_indices, teacher, param_groups, weights_of, desc, ranks)
    progress = _Progress(rows=[], best={"epoch": 0, "score": -math.inf, "state": None}, elapsed=0.0, epoch=0)
    if (run_dir / CHECKPOINT).exists():
        progress = _resume(loop, run_dir / CHECKPOINT)
        if ranks.is_main:
            log.info("%s: resuming after epoch %d from %s", desc or "run", progress.epoch, run_dir / CHECKPOINT)
    tracker = tracking.open_tracker(cfg.tracker, run_dir, desc or run_dir.name, run_config or {}) if ranks.is_main else tracking.NoTracker()
    try:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            with compile_errors(loop.compiled):  # torch.compile builds at the first step
                row = _epoch(loop, epoch, progress)
            _save_checkpoint(loop, progress)
            if ranks.is_main:
                tracker.log(tracking.epoch_scalars(row), epoch)
                _log_epoch(f"{desc} epoch {epoch}/{cfg.epochs}", row, loop.has_val, cfg.progress)
    finally:
        tracker.close()

    best = progress.best
    if ranks.is_main:
        atomic_torch_save(run_dir / weights_name, {"best": best["state"], "last": _cpu_state(loop.weights_of), "best_epoch": best["epoch"]})
    metrics = pd.DataFrame(progress.rows)
    best_row = metrics.loc[metrics["epoch"] == best["epoch"]].iloc[0]
    return FitResult(
        best_epoch=int(best["epoch"]),
        best_test_acc=float(best_row["test_acc"]),
        last_test_acc=float(metrics["test_acc"].iloc[-1]),
        epochs=len(metrics),
        metrics=metrics,
    )


def _setup(
    model: nn.Module,
    data: Data,
    cfg: TrainConfig,
    run_dir: Path,
    lr: float,
    train_indices: torch.Tensor,
    teacher: TeacherSource | None,
    param_groups: list[dict[str, Any]] | None,
    weights_of: nn.Module | None,
    desc: str,
    ranks: Ranks,
) -> _Loop:
    """Device, this rank's rows and batch, the (DDP-wrapped) model, optimizer and schedule."""
    device = distributed.device_for(ranks, resolve_device(cfg.device))
    rows = distributed.shard(train_indices, ranks)
    batch_size = distributed.local_batch_size(cfg.batch_size, ranks)
    steps = len(rows) // batch_size
    if steps == 0:
        raise ConfigError(
            f"{len(train_indices)} training images are fewer than one batch of {cfg.batch_size}; lower train.batch_size or raise train.train_subset"
        )
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if hasattr(model, "check_rows"):  # a method's per-row state (CRD's bank) covers the rows: once, not per step
        model.check_rows(rows)
    if cfg.channels_last:
        # NHWC: oneDNN (CPU) and cuDNN convolutions skip a layout conversion per call. Plain CE
        # training, 1 CPU thread (bench/bench_train_loop.py --channels-last): 1.18-1.31x the
        # images/s of NCHW for ResNet34/ResNet9 at the demo and CIFAR sizes; ViTs unchanged. Only
        # 4-D weights change layout: batches stay NCHW (the first convolution's output follows
        # its weight) and state dicts load into either layout. It changes float summation order,
        # so it is part of the run key.
        model.to(memory_format=torch.channels_last)
    compiled = compile_training_step(model, cfg.compile, device, ranks.is_main)  # before DDP wraps it (torch's advice)
    net = distributed.wrap(model, ranks, device)
    groups = param_groups if param_groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    optimizer = make_optimizer(groups, cfg, lr)
    return _Loop(
        net=net,
        compiled=compiled,
        model=model,
        weights_of=weights_of if weights_of is not None else model,
        data=data,
        cfg=cfg,
        rows=rows,
        batch_size=batch_size,
        teacher=teacher,
        labels=data.train.labels.to(device),
        images=images_on_device(data.train.images, rows, device, cfg.input_path, augment=cfg.augment, seed=cfg.seed),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, steps),
        device=device,
        amp=cfg.amp and device.type == "cuda",
        ranks=ranks,
        run_dir=run_dir,
        desc=desc,
    )


def _epoch(loop: _Loop, epoch: int, progress: _Progress) -> dict[str, float]:
    """Train one epoch, evaluate, update `progress` (rows, best state, time); the metrics row."""
    cfg, data = loop.cfg, loop.data
    # Per-epoch generators make a resumed run draw the same batches as an uninterrupted one;
    # rank 0's equals the one-process generator.
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 7919 * loop.ranks.rank)
    if loop.teacher is not None:
        batches = loop.teacher.batch_order(loop.rows, loop.batch_size, order_gen)
    else:
        batches = epoch_batches(loop.rows, loop.batch_size, order_gen)
    trained = _train_epoch(loop, epoch, batches, order_gen, progress)
    progress.elapsed += trained["epoch_time_s"]
    row: dict[str, float] = {"epoch": epoch, **{k: v for k, v in trained.items() if k not in ("epoch_time_s", "images_per_s")}}
    replaced: dict[str, set[str]] = {"test": set(), "val": set()}
    evaluate_on = lambda images, labels, split: evaluate(loop.model, data, images, labels, loop.device, cfg.eval_batch_size, loop.amp, loop.ranks, replaced[split])  # noqa: E731
    row["test_acc"] = evaluate_on(data.test.images, data.test.labels, "test")
    if loop.has_val:
        row["val_acc"] = evaluate_on(select(data.train.images, data.val_indices), data.train.labels[data.val_indices], "val")
    if counts_skips(data):  # dataset.bad_images=skip: each split's replaced files, per epoch, never silent
        counts = {"train": loop.images.skipped, "test": len(replaced["test"])} | ({"val": len(replaced["val"])} if loop.has_val else {})
        summed = distributed.sum_over_ranks(torch.tensor(list(counts.values()), dtype=torch.int64, device=loop.device), loop.ranks).tolist()
        row.update({f"skipped_{split}": int(n) for split, n in zip(counts, summed)})
    row.update(lr=loop.optimizer.param_groups[-1]["lr"], epoch_time_s=trained["epoch_time_s"], images_per_s=trained["images_per_s"], elapsed_s=progress.elapsed)
    progress.rows.append(row)
    progress.epoch = epoch
    score = row["val_acc"] if loop.has_val else row["test_acc"]
    if score > progress.best["score"]:
        progress.best = {"epoch": epoch, "score": score, "state": _cpu_state(loop.weights_of)}
    return row


class _FirstNonFinite:
    """The first step of an epoch whose loss is not finite, and its loss terms, kept on the device.

    The NaN stop used to read `isfinite(loss)` on the host before every backward: a host sync
    per step (issue 19). Now each step only updates this flag on the device, and the host reads
    it every NAN_CHECK_EVERY steps and at the epoch's end (`read`), where it still names the
    first bad step and its terms. The bad step and the few after it do update the weights
    (to NaN, usually); the run stops at the read, before the epoch's checkpoint.
    """

    def __init__(self, device: torch.device) -> None:
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # 1-based; 0: every step finite so far
        self.terms: dict[str, torch.Tensor] = {}  # each term's value at that step
        self.names: list[tuple[int, tuple[str, ...]]] = []  # (first step, loss names): a method's names rarely change

    def update(self, step: int, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """Record `step` (1-based) if its loss is the epoch's first non-finite one; no host read."""
        names = tuple(losses)
        if not self.names or self.names[-1][1] != names:
            self.names.append((step, names))
        first = (self.step == 0) & ~torch.isfinite(loss.detach())
        self.step = torch.where(first, step, self.step)
        for name, value in losses.items():
            value = value.detach().double()
            self.terms[name] = torch.where(first, value, self.terms[name]) if name in self.terms else torch.where(first, value, torch.nan)

    def read(self, *extra: torch.Tensor) -> tuple[int, list[float]]:
        """(the first bad step, 0 if none; `extra` scalars' values), in one host read."""
        values = torch.stack([self.step.double(), *(e.detach().double() for e in extra)]).tolist()
        return int(values[0]), values[1:]

    def bad_terms(self, step: int) -> dict[str, float]:
        """Loss terms of the bad `step` (after `read` found it), named as that step named them."""
        names = [names for start, names in self.names if start <= step][-1]
        return {name: float(self.terms[name]) for name in names}


def _train_epoch(loop: _Loop, epoch: int, batches: list[torch.Tensor], generator: torch.Generator, progress: _Progress) -> dict[str, float]:
    """One epoch of steps; the epoch's training metrics (summed over ranks), time and speed.

    No host read inside a step (issue 19): losses and accuracy add up on the device, the NaN flag
    is read every NAN_CHECK_EVERY steps (the progress bar's loss with it) and at the end, with
    the weight check, in one read.
    """
    cfg, data, device = loop.cfg, loop.data, loop.device
    loop.model.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), dtype=torch.int64, device=device)
    losses: dict[str, torch.Tensor] = {}
    bad = _FirstNonFinite(device)
    seen = 0
    tic = time.perf_counter()
    show = cfg.progress and loop.ranks.is_main
    bar = tqdm(batches, desc=f"{loop.desc} epoch {epoch}/{cfg.epochs}", leave=False, disable=None if show else True, unit="batch")  # None: off when not a terminal
    # where stderr is no terminal (a cluster log) a line every log_interval_s, also under --quiet,
    # which turns off the bar: a job's log is where its progress is read
    line = IntervalLine(f"{loop.desc} epoch {epoch}/{cfg.epochs}", len(batches), cfg.log_interval_s, loop.ranks.is_main)
    world = loop.ranks.world
    # The images come from the device (resident) or a prefetching thread, always images[idx] of
    # this order, so the path never changes a number.
    # `rows` is `idx` on the device, copied once per step by the image source.
    for step, (idx, (rows, raw)) in enumerate(zip(bar, loop.images.epoch(batches, epoch))):
        x = data.normalize(raw, device)
        if cfg.augment and not loop.images.augments:  # a streamed split's workers drew it per image
            x = augment_batch(x, generator)
        y = loop.labels[rows]  # no host copy per step: a gather on the device by the step's indices there
        t_feats, t_logits = loop.teacher.batch(idx, x) if loop.teacher is not None else ({}, None)
        with _autocast(device, loop.amp):
            # every method gets the same call; `Step` carries what only some use (CRD, DKD)
            logits, losses = loop.net(x, y, t_feats, t_logits, Step(rows, epoch))
        loss = sum(losses.values())
        bad.update(step + 1, loss, losses)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.optimizer.step()
        loop.scheduler.step()
        # Accumulated on the device: no host sync per step.
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        if line.due():  # one host read per line (every log_interval_s), none in between
            line.step(step + 1, seen * world, lambda: float(sum(sums.values())) / (step + 1))  # noqa: B023 - called at once
        if (step + 1) % NAN_CHECK_EVERY == 0 and step + 1 < len(batches):
            # the bar's loss comes with the flag, in the same read, and only when the bar is shown
            bad_step, shown = bad.read(*([] if bar.disable else [loss]))
            _stop_if_not_finite(bad, bad_step, epoch, len(batches), progress.rows, loop.run_dir)
            if shown:
                bar.set_postfix(loss=f"{shown[0]:.4f}", img_s=f"{seen / (time.perf_counter() - tic):.0f}")
    epoch_time = time.perf_counter() - tic
    # The flag and the weights in one read; the flag first: a bad loss explains bad weights.
    bad_step, (weights_finite,) = bad.read(_finite_state(loop.model, device))
    _stop_if_not_finite(bad, bad_step, epoch, len(batches), progress.rows, loop.run_dir)
    if not weights_finite:  # the last step made the weights inf/NaN: never checkpoint them
        last = {name: float(value.detach()) for name, value in losses.items()}
        raise _not_finite(f"the weights are not finite after the last step of epoch {epoch} (step {len(batches)})", last, progress.rows, loop.run_dir)
    # One reduction per epoch: every loss term's sum, the correct count, the images seen.
    names = list(sums)
    counts = torch.stack([correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
    totals = distributed.sum_over_ranks(torch.cat([torch.stack([sums[n] for n in names]), counts]), loop.ranks).tolist()
    n_batches = len(batches) * loop.ranks.world
    mean_terms = {n: t / n_batches for n, t in zip(names, totals)}
    row: dict[str, float] = {"train_loss": sum(mean_terms.values())}
    row.update({f"loss_{n}": v for n, v in mean_terms.items()})
    row["train_acc"] = 100.0 * totals[-2] / totals[-1]
    row.update(epoch_time_s=epoch_time, images_per_s=totals[-1] / epoch_time)
    return row


def _resume(loop: _Loop, path: Path) -> _Progress:
    """Weights, optimizer, schedule, RNGs and progress from the last epoch's checkpoint.

    Each rank takes its own RNG state back (a checkpoint of a run on another number of ranks
    gives every rank rank 0's: the remaining epochs then draw other batches than an
    uninterrupted run would, which is logged).
    """
    ranks, device = loop.ranks, loop.device
    ckpt = _load_checkpoint(path)
    loop.model.load_state_dict(ckpt["model"])
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    loop.scheduler.load_state_dict(ckpt["scheduler"])
    saved_world = int(ckpt.get("world", 1))
    states = ckpt.get("rng_ranks") or [(ckpt["rng"], ckpt.get("cuda_rng"))]
    cpu_rng, cuda_rng = states[ranks.rank] if saved_world == ranks.world else states[0]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_rng)
    if saved_world != ranks.world and ranks.is_main:
        log.warning("%s was written by a run on %d rank(s), resumed on %d: later batches differ from an uninterrupted run", path, saved_world, ranks.world)
    return _Progress(rows=ckpt["rows"], best=ckpt["best"], elapsed=ckpt["elapsed"], epoch=ckpt["epoch"])


def _save_checkpoint(loop: _Loop, progress: _Progress) -> None:
    """metrics.csv and checkpoint.pt after an epoch, written by rank 0 with every rank's RNGs."""
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if loop.device.type == "cuda" else None)
    states = distributed.gather(rng, loop.ranks)
    if not loop.ranks.is_main:
        return
    _write_metrics(loop.run_dir / METRICS, progress.rows)
    atomic_torch_save(
        loop.run_dir / CHECKPOINT,
        {
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "rng": rng[0],
            "cuda_rng": rng[1],
            "rng_ranks": states if loop.ranks.distributed else None,
            "world": loop.ranks.world,
            "rows": progress.rows,
            "best": progress.best,
            "elapsed": progress.elapsed,
            "epoch": progress.epoch,
        },
    )


def _log_epoch(desc: str, row: dict[str, float], has_val: bool, progress_bar: bool) -> None:
    line = (
        f"{desc}: loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% "
        f"test {row['test_acc']:.2f}%" + (f" val {row['val_acc']:.2f}%" if has_val else "") + f" ({row['epoch_time_s']:.1f}s)"
    )
    if progress_bar:
        tqdm.write(line)  # keeps the progress bar intact
    else:
        log.info(line)


def finish(run_dir: Path, result: FitResult) -> None:
    """Mark a run finished: summary.yaml, then `done`, then drop the resume checkpoint.

    `done` comes before the checkpoint's removal: a run killed in between is finished and keeps
    a stale checkpoint (harmless: finished runs are skipped), never unfinished without a
    checkpoint, which would train it again from epoch 1.
    """
    atomic_write_yaml(
        run_dir / "summary.yaml",
        {
            "best_epoch": result.best_epoch,
            "best_test_acc": result.best_test_acc,
            "last_test_acc": result.last_test_acc,
            "epochs": result.epochs,
            "train_time_s": float(result.metrics["elapsed_s"].iloc[-1]),
        },
    )
    (run_dir / artifacts.FAILED).unlink(missing_ok=True)
    atomic_write_text(run_dir / artifacts.DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def _stop_if_not_finite(bad: _FirstNonFinite, bad_step: int, epoch: int, steps: int, rows: list[dict[str, float]], run_dir: Path) -> None:
    """The NaN stop, once `bad.read` has found a bad step (0: none)."""
    if bad_step:
        raise _not_finite(f"loss is not finite at epoch {epoch}, step {bad_step} of {steps}", bad.bad_terms(bad_step), rows, run_dir)


def _not_finite(what: str, losses: dict[str, float], rows: list[dict[str, float]], run_dir: Path) -> TrainingError:
    """The NaN stop's one line: where, each loss term (named as in metrics.csv), what is kept."""
    terms = ", ".join(f"loss_{k}={v:.4g}" for k, v in losses.items())
    kept = (
        f"the last good checkpoint, epoch {int(rows[-1]['epoch'])}, is kept in {run_dir}"
        if rows
        else f"no epoch finished, so {run_dir} holds no checkpoint"
    )
    return TrainingError(f"{what} ({terms}); {kept}; lower train.lr or check the inputs")


def _finite_state(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Whether every floating parameter and buffer (BatchNorm statistics too) is finite, as one
    device scalar: the per-tensor checks reduced on the device, so the host reads it once per
    epoch (it read each tensor's, 132 for ResNet9: issue 19)."""
    checks = [torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()]
    return torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=device)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    atomic_write(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint is written atomically, so this is disk damage
        raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to restart the run") from None
