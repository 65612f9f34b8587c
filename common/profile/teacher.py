"""The teacher: check its name, train it once (CE, METHOD 5), load it with its checkpoint's hash.

What stage 2 reads from it per batch is in common/train/teacher_source.py.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from common.artifacts import layout as artifacts
from common.config import Config, MethodConfig, to_dict
from common.data.registry import Data
from common.errors import CacheError
from common.files import sha256_file
from common.runtime import peak_rss_mb, versions
from common.layers.hooks import backbone_and_head_parameters
from common.methods import build_distiller, resolve_method
from common.models import MODELS, create_model
from common.runtime import seed_everything
from common.train.loop import finish, fit

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


def ensure_teacher(cfg: Config, data: Data) -> Path:
    """Train the teacher unless a finished one exists; returns the directory holding teacher.pt.

    Locked, so concurrent shell loops that share a teacher train it once (`make report` reads
    the held lock as "running"). A crash leaves `failed` with the error; a finished teacher
    whose teacher.pt was deleted (the fix for a damaged one) is trained again.
    """
    tdir = artifacts.teacher_dir(cfg, data)
    with artifacts.locked(tdir):
        if (tdir / artifacts.DONE).exists() and (tdir / WEIGHTS).exists():
            log.info("teacher %s: finished, skipping training (%s)", cfg.teacher.name, tdir)
            return tdir
        if (tdir / artifacts.DONE).exists():
            log.info("teacher %s: %s is missing, training the teacher again", cfg.teacher.name, tdir / WEIGHTS)
            (tdir / artifacts.DONE).unlink()
        log.info("teacher %s: training %d epochs -> %s", cfg.teacher.name, cfg.teacher_train.epochs, tdir)
        seed_everything(cfg.teacher_train.seed)
        model = build_teacher(cfg, data, pretrained=True)
        ce = build_distiller(
            resolve_method(MethodConfig(name="ce")),
            model,
            num_classes=data.num_classes,
            input_shape=(data.in_channels, data.image_size, data.image_size),
            teacher_layers=[],
            student_layers=[],
            teacher_shapes={},
        )
        lr = cfg.teacher_train.lr if cfg.teacher_train.lr is not None else MODELS.get(cfg.teacher.name).lr_ce
        groups = None
        if cfg.teacher.pretrained:
            # Pretrained backbones get a 100x smaller LR than the new head (METHOD 5).
            backbone, head = backbone_and_head_parameters(model)
            groups = [{"params": backbone, "lr": lr * cfg.teacher_train.backbone_lr_mult}, {"params": head, "lr": lr}]
        with artifacts.attempt(tdir, {**to_dict(cfg), "run": {"kind": "teacher", "versions": versions()}}):
            result = fit(
                ce,
                data,
                cfg.teacher_train,
                tdir,
                lr=lr,
                train_indices=data.training_subset(cfg.teacher_train.train_subset, cfg.dataset.split_seed),
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
