"""Atomic file writes, inter-process locks, hashing and version stamps for artifacts.

Every artifact is written to a temporary file in its final directory and renamed into place,
so a run killed half-way leaves the old artifact or none, never a broken one.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp onto `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def atomic_torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing), held for the block.

    Two shell loops that need the same teacher/profile serialise here: the second waits, then
    finds the artifact done and skips the work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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

    return {
        "code": code_version(),
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "cuda": torch.version.cuda or "none",
        "platform": platform.platform(),
    }
