"""Where and how a process computes: device choice, seeding, CUDA determinism on request, and
what it costs and runs on (peak memory, bytes written, the RAM budget, the recorded versions),
and the progress lines it writes to a log that is not a terminal (`IntervalLine`).

Every stage calls `resolve_device` before its first CUDA call, which is where KD_DETERMINISTIC=1
takes effect; `seed_everything` is what fixes a run's result on the CPU. torch is imported inside
the functions that need it: stage 3 and the report read `versions`-free parts of this module and
must start without torch.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from common.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kd")

# Set to 1 to make CUDA runs repeat exactly (see `set_deterministic`); the CPU needs nothing.
DETERMINISTIC_ENV = "KD_DETERMINISTIC"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); on the CPU this fixes a run's result."""
    import numpy as np
    import torch

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
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's `device` value; applies KD_DETERMINISTIC=1 first."""
    import torch

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


# ----------------------------------------------------------------------------- costs and versions


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def io_written_mb() -> float:
    """MiB this process has caused to be written to storage so far (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["write_bytes"]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


def release_free_memory() -> None:
    """Hand memory that is free inside the process back to the system (glibc's malloc_trim).

    Streaming loops allocate and free many 1-32 MB tensors; glibc keeps the freed ones in its
    heap, fragmented, so the resident size grows with every class or pass although live data
    does not (measured on a full-width ResNet34 profile: 4.3 GB resident, 1.8 GB after a trim).
    A no-op where glibc is absent.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def code_version() -> str:
    """`git describe` of this checkout (with -dirty), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions recorded in every run directory, for reproducibility."""
    import h5py
    import numpy
    import torch

    return {
        "code": code_version(),
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "cuda": torch.version.cuda or "none",
        "platform": platform.platform(),
    }


def ram_budget() -> int:
    """Half of the available memory (Linux /proc; 4 GiB elsewhere): the feature cache goes to
    RAM when it fits in this."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info.get("MemAvailable", 0) // 2
    except OSError:
        return 4 << 30


# ----------------------------------------------------------------------------- progress lines
# For logs that are not a terminal (Slurm, nohup, `make ... > log`). There tqdm's bar is off
# (`disable=None`), so a long loop printed nothing until its end: an epoch of the demo teacher on
# a busy 2-core machine was silent for 49 minutes, an ImageNet epoch takes an hour. `IntervalLine`
# writes one log line every `interval_s` seconds instead (timm's `log_interval`, torchvision's
# reference `print_freq`): done/total, items per second, the running loss where there is one, and
# the loop's ETA. On a terminal the bar shows the same, so no line is written there. Runtime only:
# the interval (train.log_interval_s, profile.log_interval_s) is never part of an artifact's key.

def format_duration(seconds: float) -> str:
    """'1h02m', '5m12s', '42s': the ETA's form, minutes when it is longer than a minute."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class IntervalLine:
    """One log line per `interval_s` over a loop of `total` steps (batches, or rows: `what`; 0: not
    known ahead, then the line gives the time so far instead of an ETA), only
    when `stream` (stderr, where the bar and the log go) is not a terminal and `enabled` (False on
    the ranks of a torchrun job other than 0). Not tied to the bar's `progress` setting: `--quiet`
    turns the bar off, and a cluster job's log still wants its progress lines.

        line = IntervalLine("teacher epoch 3/50", len(batches), cfg.log_interval_s, cfg.progress, unit="img")
        for step, batch in enumerate(batches):
            ...
            line.step(step + 1, images_so_far, lambda: running_loss)  # the loss is read only when a line is due

    `due` is one clock read, so the check costs nothing per step; the loss callable (a host read
    of a device value) runs once per line.
    """

    def __init__(
        self, desc: str, total: int, interval_s: float, enabled: bool = True, unit: str = "img", what: str = "batch",
        stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.desc, self.total, self.interval_s, self.unit, self.what, self.clock = desc, total, interval_s, unit, what, clock
        self.on = bool(enabled and interval_s > 0 and not _is_terminal(stream))
        self.start = clock()
        self.next_at = self.start + interval_s

    def due(self) -> bool:
        return self.on and self.clock() >= self.next_at

    def step(self, done: int, items: int, loss: Callable[[], float] | None = None) -> str | None:
        """Log the line when one is due (`done` of `total` steps, `items` processed so far);
        returns it, or None."""
        if not self.due():
            return None
        now = self.clock()
        self.next_at = now + self.interval_s
        elapsed = max(now - self.start, 1e-9)
        eta = elapsed / max(done, 1) * (self.total - done)
        counted = f"{self.what} {done}/{self.total}" if self.total else f"{self.what} {done}"
        parts = [f"{self.desc}: {counted}", f"{items / elapsed:.0f} {self.unit}/s"]
        if loss is not None:
            parts.append(f"loss {loss():.4f}")
        parts.append(f"ETA {format_duration(eta)}" if self.total else f"{format_duration(elapsed)} so far")
        line = ", ".join(parts)
        log.info(line)
        return line


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
