"""The optimizer and LR schedule of a training run (METHOD 8.7, 9): the paper's AdamW + OneCycle
or the reference's "+240E" SGD + MultiStep, both stepped once per batch."""
from __future__ import annotations

from typing import Any

import torch

from common.config import TrainConfig


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (the paper's recipe, METHOD 8.7) or SGD with momentum (the reference's "+240E")."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. OneCycle over the steps actually taken (section 0 item 6);
    MultiStep drops the LR by `gamma` after each milestone epoch, which per batch is after
    milestone x steps_per_epoch steps (the reference steps it once per epoch: the same LRs)."""
    if cfg.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * steps_per_epoch for m in cfg.milestones], gamma=cfg.gamma)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.pct_start
    )
