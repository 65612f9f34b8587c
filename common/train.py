"""The one training loop, shared by teachers, CE students and every distillation method.

AdamW + OneCycle stepped per batch (METHOD 5, 8.7; section 0 item 6: the scheduler gets the
number of steps actually taken), per-epoch evaluation on the whole test set (and the validation
split when there is one), a checkpoint every epoch, resume to the same result, NaN stop.

The loop knows nothing of any method: it calls `distiller.forward_train` and sums the losses.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from common.cache import epoch_batches
from common.config import TrainConfig
from common.data import Data, augment_batch
from common.errors import ConfigError, TrainingError
from common.io import atomic_torch_save, atomic_write, atomic_write_text, atomic_write_yaml

log = logging.getLogger("kd")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


class TeacherSource(Protocol):
    """Teacher knowledge for one batch: ({layer: feature}, logits or None)."""

    def batch_order(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch's batches of `indices` in the order this source reads best (drop_last)."""
        ...

    def batch(self, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        ...


class Trainable(Protocol):
    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, teacher_features: dict[int, torch.Tensor], teacher_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...

    def forward_eval(self, images: torch.Tensor) -> torch.Tensor:
        ...


# Set to 1 to make CUDA runs repeat exactly (see `set_deterministic`); the CPU needs nothing.
DETERMINISTIC_ENV = "KD_DETERMINISTIC"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); on the CPU this fixes a run's result."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_requested() -> bool:
    return os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_deterministic() -> None:
    """Deterministic GPU kernels: the same seed then gives the same numbers run after run.

    On the CPU a run is already fixed by its seed (for one torch build and thread count). On a
    GPU, cuDNN's autotuner may pick other convolution algorithms per run, and kernels that
    accumulate with atomics (index_add_, scatter_add_, some convolution backward passes) sum in
    a varying order; this turns both off. cuBLAS needs a fixed workspace, read when its handle is
    created, so the variable is set before the first CUDA matmul. `warn_only`: an op without a
    deterministic kernel warns instead of stopping a long run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's `device` value; applies KD_DETERMINISTIC=1 first."""
    if deterministic_requested():  # every stage picks its device before its first CUDA call
        set_deterministic()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but no CUDA GPU is visible; use train.device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


@dataclass
class FitResult:
    best_epoch: int
    best_test_acc: float
    last_test_acc: float
    epochs: int
    metrics: pd.DataFrame


@torch.no_grad()
def evaluate(model: Trainable, data: Data, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int, amp: bool) -> float:
    """Top-1 accuracy in percent over every given image (section 0 item 6: the whole test set)."""
    was_training = model.training  # type: ignore[attr-defined]
    model.eval()  # type: ignore[attr-defined]
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = data.normalize(images[start : start + batch_size], device)
        with _autocast(device, amp):
            logits = model.forward_eval(x)
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    model.train(was_training)  # type: ignore[attr-defined]
    return 100.0 * correct / max(1, len(labels))


def _autocast(device: torch.device, amp: bool):
    # bfloat16 needs no loss scaling; on the CPU we stay in float32 so seeds fix results exactly.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


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
) -> FitResult:
    """Train `model` (a Distiller: forward_train/forward_eval) and write the run's artifacts.

    Writes metrics.csv and checkpoint.pt every epoch; at the end `weights_name` holding
    {"best": state, "last": state, "best_epoch": e} of `weights_of` (default: the whole model).
    "best" is the epoch of best validation accuracy when a validation split exists, else of best
    test accuracy (the paper's protocol, METHOD 10). A checkpoint found in `run_dir` is resumed.
    """
    device = resolve_device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights_of = weights_of if weights_of is not None else model
    steps = len(train_indices) // cfg.batch_size
    if steps == 0:
        raise ConfigError(
            f"{len(train_indices)} training images are fewer than one batch of {cfg.batch_size}; lower train.batch_size or raise train.train_subset"
        )
    model.to(device)
    groups = param_groups if param_groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=cfg.epochs * steps, pct_start=cfg.pct_start
    )
    amp = cfg.amp and device.type == "cuda"
    rows: list[dict[str, float]] = []
    best = {"epoch": 0, "score": -math.inf, "state": None}
    start_epoch = 1
    elapsed = 0.0

    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        rows, best, elapsed = ckpt["rows"], ckpt["best"], ckpt["elapsed"]
        start_epoch = ckpt["epoch"] + 1
        log.info("%s: resuming after epoch %d from %s", desc or "run", ckpt["epoch"], ckpt_path)

    train_images, train_labels = data.train.images, data.train.labels
    has_val = len(data.val_indices) > 0
    for epoch in range(start_epoch, cfg.epochs + 1):
        # Per-epoch generators make a resumed run draw the same batches as an uninterrupted one.
        order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        if teacher is not None:
            batches = teacher.batch_order(train_indices, cfg.batch_size, order_gen)
        else:
            batches = epoch_batches(train_indices, cfg.batch_size, order_gen)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        correct: torch.Tensor | int = 0
        seen = 0
        tic = time.perf_counter()
        bar = tqdm(batches, desc=f"{desc} epoch {epoch}/{cfg.epochs}", leave=False, disable=None if cfg.progress else True, unit="batch")  # None: off when not a terminal
        for step, idx in enumerate(bar):
            x = data.normalize(train_images[idx], device)
            if cfg.augment:
                x = augment_batch(x, order_gen)
            y = train_labels[idx].to(device, non_blocking=True)
            t_feats, t_logits = teacher.batch(idx, x) if teacher is not None else ({}, None)
            with _autocast(device, amp):
                logits, losses = model.forward_train(x, y, t_feats, t_logits)  # type: ignore[operator]
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise _not_finite(f"loss is not finite at epoch {epoch}, step {step + 1} of {len(batches)}", losses, rows, run_dir)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Accumulated on the device: no host sync per step beyond the NaN check.
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double()
            correct = correct + (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
            if not bar.disable and step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{seen / (time.perf_counter() - tic):.0f}")
        epoch_time = time.perf_counter() - tic
        if not _finite_state(model):  # the last step made the weights inf/NaN: never checkpoint them
            raise _not_finite(f"the weights are not finite after the last step of epoch {epoch} (step {len(batches)})", losses, rows, run_dir)
        elapsed += epoch_time
        totals = {k: float(v) for k, v in sums.items()}
        row: dict[str, float] = {"epoch": epoch, "train_loss": sum(totals.values()) / len(batches)}
        row.update({f"loss_{k}": v / len(batches) for k, v in totals.items()})
        row["train_acc"] = 100.0 * int(correct) / seen
        row["test_acc"] = evaluate(model, data, data.test.images, data.test.labels, device, cfg.eval_batch_size, amp)  # type: ignore[arg-type]
        if has_val:
            vi = data.val_indices
            row["val_acc"] = evaluate(model, data, train_images[vi], train_labels[vi], device, cfg.eval_batch_size, amp)  # type: ignore[arg-type]
        row.update(
            lr=optimizer.param_groups[-1]["lr"],
            epoch_time_s=epoch_time,
            images_per_s=seen / epoch_time,
            elapsed_s=elapsed,
        )
        rows.append(row)
        score = row["val_acc"] if has_val else row["test_acc"]
        if score > best["score"]:
            best = {"epoch": epoch, "score": score, "state": _cpu_state(weights_of)}
        _write_metrics(run_dir / METRICS, rows)
        atomic_torch_save(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "rows": rows,
                "best": best,
                "elapsed": elapsed,
                "epoch": epoch,
            },
        )
        line = (
            f"{desc} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% "
            f"test {row['test_acc']:.2f}%" + (f" val {row['val_acc']:.2f}%" if has_val else "") + f" ({epoch_time:.1f}s)"
        )
        if cfg.progress:
            tqdm.write(line)  # keeps the progress bar intact
        else:
            log.info(line)

    atomic_torch_save(
        run_dir / weights_name,
        {"best": best["state"], "last": _cpu_state(weights_of), "best_epoch": best["epoch"]},
    )
    metrics = pd.DataFrame(rows)
    best_row = metrics.loc[metrics["epoch"] == best["epoch"]].iloc[0]
    return FitResult(
        best_epoch=int(best["epoch"]),
        best_test_acc=float(best_row["test_acc"]),
        last_test_acc=float(metrics["test_acc"].iloc[-1]),
        epochs=len(metrics),
        metrics=metrics,
    )


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
    (run_dir / "failed").unlink(missing_ok=True)
    atomic_write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def _not_finite(what: str, losses: dict[str, torch.Tensor], rows: list[dict[str, float]], run_dir: Path) -> TrainingError:
    """The NaN stop's one line: where, each loss term (named as in metrics.csv), what is kept."""
    terms = ", ".join(f"loss_{k}={float(v.detach()):.4g}" for k, v in losses.items())
    kept = (
        f"the last good checkpoint, epoch {int(rows[-1]['epoch'])}, is kept in {run_dir}"
        if rows
        else f"no epoch finished, so {run_dir} holds no checkpoint"
    )
    return TrainingError(f"{what} ({terms}); {kept}; lower train.lr or check the inputs")


def _finite_state(model: nn.Module) -> bool:
    """Every floating parameter and buffer (BatchNorm statistics too) is finite; one check per epoch."""
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    atomic_write(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint is written atomically, so this is disk damage
        raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to restart the run") from None
