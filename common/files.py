"""Atomic file writes, inter-process locks, disk-full errors and file hashes for artifacts.

Every artifact is written to a temporary file in its final directory and renamed into place,
so a run killed half-way leaves the old artifact or none, never a broken one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from common.errors import DiskFullError

# A torch.save or HDF5 write that fails this close to a full disk is taken for a full disk
# (torch reports ENOSPC only as "unexpected pos ..."; by then the temp file has taken the rest).
_NEARLY_FULL_BYTES = 16 << 20


def tmp_path(path: Path) -> Path:
    """Per-writer temp name (host and pid) next to `path`: parallel writers never clobber each
    other, and the temp file of a killed writer can be told from a live one's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(path: Path) -> None:
    """Delete temp files that killed writers (SIGKILL, power loss) of `path` left on this host;
    live writers' temp files are left alone."""
    path = Path(path)
    prefix, host = f".{path.name}.", socket.gethostname()
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        stem = tmp.name[len(prefix) : -len(".tmp")]
        tmp_host, _, pid = stem.rpartition(".")
        if tmp_host != host or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether `exc` (or what it wraps) means the disk holding `directory` is full.

    OSError ENOSPC/EDQUOT directly or in h5py's text ("errno = 28"); torch.save only says
    "unexpected pos" or "file write failed", so those count when the disk is nearly full.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text:
            return True
        if isinstance(current, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
            with contextlib.suppress(OSError):
                return shutil.disk_usage(mount_point(directory)).free < _NEARLY_FULL_BYTES
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(path: Path) -> DiskFullError:
    """The one-line error for a write of `path` that ran out of space."""
    mount = mount_point(Path(path).parent)
    return DiskFullError(
        f"disk full writing {path} (no space left on {mount}); the partial file was removed and earlier "
        f"artifacts are intact; free space on {mount} or pass artifacts=DIR on another disk, then rerun"
    )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp onto `path` (same directory, so the rename is atomic).

    Any exception (SIGTERM arrives as one, see common.cli) removes the temp file; a SIGKILLed
    writer's temp file is removed by the next write of `path`. A full disk is a DiskFullError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, path.parent)  # asked before the temp file frees the space
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path) from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch  # here, so that stage 3 (common.report.runner) imports this module without torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def lock_held(path: Path) -> bool:
    """Whether a live process holds `file_lock(path)` right now: a non-blocking try that
    creates nothing (the kernel drops a dead process's flock, so a killed run reads False)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
