"""Where and how a process computes: device choice, seeding, and CUDA determinism on request.

Every stage calls `resolve_device` before its first CUDA call, which is where KD_DETERMINISTIC=1
takes effect; `seed_everything` is what fixes a run's result on the CPU.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from common.errors import ConfigError

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
