"""The teacher: check its name, train it once (CE, METHOD 5) or take a checkpoint as it is, load
it with its checkpoint's hash.

Whether a checkpoint (`teacher.pretrained`) is trained further or used as it is, is decided in one
place, `teacher_as_is` (the setting `teacher.finetune`, in common/models/as_is.py, below the
artifacts' layout); the teacher directory's key and `ensure_teacher` both follow it. What stage 2 reads from the teacher per batch is in
common/train/teacher_source.py.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pandas as pd
import torch
import yaml
from torch import nn

from common.artifacts import layout as artifacts
from common.config import Config, MethodConfig, to_dict
from common.data.registry import Data
from common.data.stream import select
from common.errors import CacheError, ConfigError
from common.files import atomic_torch_save, atomic_write, sha256_file
from common.runtime import peak_rss_mb, resolve_device, versions
from common.layers.hooks import backbone_and_head_parameters
from common.methods import Distiller, build_distiller, resolve_method
from common.models import MODELS, create_model
from common.models.as_is import teacher_as_is
from common.runtime import seed_everything
from common.train.loop import METRICS, FitResult, counts_skips, evaluate, finish, fit

log = logging.getLogger("kd")

WEIGHTS = "teacher.pt"


def check_names(cfg: Config) -> None:
    """Fail on a misspelt model or method name before any long work starts."""
    MODELS.get(cfg.teacher.name)
    MODELS.get(cfg.student.name)
    resolve_method(cfg.method)


def build_teacher(cfg: Config, data: Data, pretrained: bool = False) -> nn.Module:
    return create_model(
        cfg.teacher.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        width=cfg.teacher.width,
        pretrained=cfg.teacher.pretrained if pretrained else None,
    )


def _ce(model: nn.Module, data: Data) -> Distiller:
    """`model` as a CE-only Distiller: what the loop trains and evaluates."""
    return build_distiller(
        resolve_method(MethodConfig(name="ce")),
        model,
        num_classes=data.num_classes,
        input_shape=(data.in_channels, data.image_size, data.image_size),
        teacher_layers=[],
        student_layers=[],
        teacher_shapes={},
    )


def _check_finetuned_from(cfg: Config, tdir: Path) -> None:
    """A fine-tuned teacher's directory is keyed by its checkpoint's file NAME (the key teachers had
    before checkpoints could be used as they are, kept so those directories are found again), so
    another file of the same name would find it too: the content recorded when it was trained
    (config.yaml run.pretrained_sha256) must match, or the finished teacher, or the checkpoint
    resumed, is someone else's."""
    if not cfg.teacher.pretrained or not (tdir / artifacts.CONFIG).exists():
        return
    recorded = ((yaml.safe_load((tdir / artifacts.CONFIG).read_text()) or {}).get("run") or {}).get("pretrained_sha256")
    if recorded is None:  # made before the content was recorded, or used as it is (keyed by content)
        return
    path = Path(cfg.teacher.pretrained).expanduser()
    current = sha256_file(path)
    if current != recorded:
        raise ConfigError(
            f"teacher.pretrained={path} has other content (sha256 {current[:12]}) than the checkpoint of the same name "
            f"that the teacher in {tdir} was fine-tuned from ({recorded[:12]}); rename one of the two files "
            f"(a fine-tuned teacher is keyed by its checkpoint's file name)"
        )


def ensure_teacher(cfg: Config, data: Data) -> Path:
    """Train the teacher, or take its checkpoint as it is (`teacher_as_is`), unless a finished
    one exists; returns the directory holding teacher.pt.

    Locked, so concurrent shell loops that share a teacher train it once (`make report` reads
    the held lock as "running"). A crash leaves `failed` with the error; a finished teacher
    whose teacher.pt was deleted (the fix for a damaged one) is made again.
    """
    tdir = artifacts.teacher_dir(cfg, data)
    with artifacts.locked(tdir):
        _check_finetuned_from(cfg, tdir)
        if (tdir / artifacts.DONE).exists() and (tdir / WEIGHTS).exists():
            log.info("teacher %s: finished, skipping training (%s)", cfg.teacher.name, tdir)
            return tdir
        if (tdir / artifacts.DONE).exists():
            log.info("teacher %s: %s is missing, making the teacher again", cfg.teacher.name, tdir / WEIGHTS)
            (tdir / artifacts.DONE).unlink()
        if teacher_as_is(cfg, data):
            _use_as_is(cfg, data, tdir)
            return tdir
        log.info("teacher %s: training %d epochs -> %s", cfg.teacher.name, cfg.teacher_train.epochs, tdir)
        seed_everything(cfg.teacher_train.seed)
        model = build_teacher(cfg, data, pretrained=True)
        ce = _ce(model, data)
        lr = cfg.teacher_train.lr if cfg.teacher_train.lr is not None else MODELS.get(cfg.teacher.name).lr_ce
        groups = None
        if cfg.teacher.pretrained:
            # Pretrained backbones get a 100x smaller LR than the new head (METHOD 5).
            backbone, head = backbone_and_head_parameters(model)
            groups = [{"params": backbone, "lr": lr * cfg.teacher_train.backbone_lr_mult}, {"params": head, "lr": lr}]
        run = {"kind": "teacher", "versions": versions()}
        if cfg.teacher.pretrained:
            run["pretrained_sha256"] = sha256_file(Path(cfg.teacher.pretrained).expanduser())
        with artifacts.attempt(tdir, {**to_dict(cfg), "run": run}):
            result = fit(
                ce,
                data,
                cfg.teacher_train,
                tdir,
                lr=lr,
                train_indices=data.training_subset(cfg.teacher_train.train_subset, cfg.dataset.split_seed, "teacher_train.train_subset"),
                param_groups=groups,
                weights_name=WEIGHTS,
                weights_of=model,
                desc=f"teacher {cfg.teacher.name}",
                run_config=to_dict(cfg),
            )
            finish(tdir, result)
        log.info(
            "teacher %s: best test accuracy %.2f%% at epoch %d (%.0fs training, peak RSS so far %.0f MiB)",
            cfg.teacher.name, result.best_test_acc, result.best_epoch, float(result.metrics["elapsed_s"].iloc[-1]), peak_rss_mb(),
        )
        return tdir


def _use_as_is(cfg: Config, data: Data, tdir: Path) -> None:
    """The checkpoint as the teacher, under the same attempt as training (config.yaml, `failed` on
    a crash, `finish`): teacher.pt in fit's format with "best" = "last" = the loaded weights and
    best_epoch 0 (no epoch trained), and metrics.csv with one row, epoch 0, holding the test (and
    validation) accuracy measured by the loop's `evaluate`, which stage 3 reports as the
    teacher's accuracy (`common.artifacts.discovery.run_summary`)."""
    t, train = cfg.teacher, cfg.teacher_train
    with artifacts.attempt(tdir, {**to_dict(cfg), "run": {"kind": "teacher", "as_is": True, "versions": versions()}}):
        model = build_teacher(cfg, data, pretrained=True)
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        atomic_torch_save(tdir / WEIGHTS, {"best": state, "last": state, "best_epoch": 0})
        device = resolve_device(train.device)
        ce = _ce(model.to(device), data)
        amp = train.amp and device.type == "cuda"  # as fit evaluates a trained teacher
        replaced: dict[str, set[str]] = {"test": set(), "val": set()}
        row = {"epoch": 0, "test_acc": evaluate(ce, data, data.test.images, data.test.labels, device, train.eval_batch_size, amp, replaced=replaced["test"])}
        if len(data.val_indices) > 0:
            val = data.val_indices
            row["val_acc"] = evaluate(
                ce, data, select(data.train.images, val), data.train.labels[val], device, train.eval_batch_size, amp, replaced=replaced["val"]
            )
        if counts_skips(data):  # as the loop counts them (no training split read here)
            row.update({f"skipped_{split}": len(files) for split, files in replaced.items() if split == "test" or "val_acc" in row})
        row["elapsed_s"] = 0.0  # cumulative training time
        metrics = pd.DataFrame([row])
        atomic_write(tdir / METRICS, lambda tmp: metrics.to_csv(tmp, index=False))
        finish(tdir, FitResult(best_epoch=0, best_test_acc=row["test_acc"], last_test_acc=row["test_acc"], epochs=0, metrics=metrics))
    log.info("teacher %s: checkpoint %s used as it is (no fine-tuning): test accuracy %.2f%% (%s)", t.name, t.pretrained, row["test_acc"], tdir)


def load_teacher(cfg: Config, data: Data, device: torch.device) -> tuple[nn.Module, str]:
    """The finished teacher (best epoch, METHOD 5) in eval mode, and its checkpoint's sha256."""
    path = _checked_weights(cfg, data)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["best"]
        model = build_teacher(cfg, data)
        model.load_state_dict(state)
    except Exception as exc:
        raise _damaged(cfg, path, exc) from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha256_file(path)


def checkpoint_sha(cfg: Config, data: Data) -> str:
    """sha256 of the finished teacher's checkpoint (what every cache of its outputs is keyed by)."""
    return sha256_file(_checked_weights(cfg, data))


def _teacher_command(cfg: Config) -> str:
    return f"make teacher DATASET={cfg.dataset.name} TEACHER={cfg.teacher.name}"


def _checked_weights(cfg: Config, data: Data) -> Path:
    """teacher.pt, if it exists and is a torch zip archive at all (a cheap look at its central
    directory): a garbage or truncated file is named as such, not reported as a stale cache."""
    path = artifacts.teacher_dir(cfg, data) / WEIGHTS
    if not path.exists():
        raise CacheError(f"no trained teacher at {path}; train it with: {_teacher_command(cfg)}")
    if not zipfile.is_zipfile(path):
        raise _damaged(cfg, path, ValueError("not a torch checkpoint archive (garbage or truncated)"))
    return path


def _damaged(cfg: Config, path: Path, exc: Exception) -> CacheError:
    reason = (str(exc).strip().splitlines() or [""])[0][:120]
    return CacheError(
        f"teacher checkpoint {path} is damaged ({type(exc).__name__}: {reason}); delete it and retrain "
        f"the teacher with: {_teacher_command(cfg)}"
    )
