"""Where artifacts live and what keys them.

    <artifacts>/<dataset>/<teacher>-<thash>/                 teacher.pt, metrics.csv, config.yaml, done,
                                                             features-<dtype>.h5 (teacher outputs, rows on demand)
    <artifacts>/<dataset>/<teacher>-<thash>/quality-<qhash>/ layer_stats.csv (S/I/E/Q), [activations.h5]
    <artifacts>/<dataset>/<teacher>-<thash>/profile-<phash>/ profile.yaml (stage 1 -> stage 2), quality.csv,
                                                             quality.png, selection.yaml, done
    <artifacts>/<dataset>/<teacher>__<student>/<method>-<rhash>/seed<k>/
                                                             config.yaml, metrics.csv, student.pt, done
    <artifacts>/<dataset>/<student>-<shash>/quality-<qhash>/, profile-<phash>/
                                                             a CE student's own S/I/E/Q and top-k by Q
                                                             (method.student_layers=Q), keyed by its checkpoint

This module builds these paths and reads them back (`iter_variants`, `iter_teachers`): the
layout has this one home.

Directory names hold no ':' (`scp`, `rsync` and `tar` read it as a host separator; Windows and
some object stores refuse it): a model name's ':' (`tv:resnet18`, `cifar:resnet8x4`) is written
`--` on disk (`dir_name`, as Hugging Face's cache writes a repo id's '/'), and read back as ':'
(`model_name_of`), so run keys, hashes, `teacher_id` and everything a stage records keep the
model's own name. A tree made before (with ':' in its names) is still found: `teacher_dir` and
`pair_dir` use a directory of the old name where only that one exists, and reading the tree
back gives the same names for both spellings.

Each hash covers exactly the resolved settings that change the artifact (not the device, the
progress bar or the data root), so two runs that differ in anything but the seed never share a
directory, and a rerun with the same settings finds its finished work. Keys follow dependencies:
S/I/E/Q depend on the analysis pool and subsets only (qhash), the selection adds k, the
criterion and an explicit list (phash), and a run depends on the teacher layers it uses, not
on how they were chosen (rhash).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from common.config import Config, TrainConfig, short_hash
from common.errors import ConfigError, UserError
from common.files import atomic_write_text, atomic_write_yaml, file_lock, sha256_file

if TYPE_CHECKING:  # annotations only: stage 3 reads the layout without importing torch
    from common.data.registry import Data

# The marker files of a teacher, profile or run directory, named here and nowhere else.
CONFIG = "config.yaml"  # the resolved config, versions and seed, written before any training
DONE = "done"  # finished: a rerun skips it
FAILED = "failed"  # the last attempt's error (first line: the report's error column)
LOCK = ".lock"  # held while a process trains it (the report reads a held lock as "running")


@contextlib.contextmanager
def locked(run_dir: Path, holder: bool = True) -> Iterator[None]:
    """The directory's lock, taken by the holder alone (under torchrun rank 0 holds it for all
    ranks: the others would wait on it forever while rank 0 waits for them in a collective)."""
    if not holder:
        yield
        return
    with file_lock(Path(run_dir) / LOCK):
        yield


@contextlib.contextmanager
def attempt(run_dir: Path, resolved: dict[str, Any], writer: bool = True) -> Iterator[None]:
    """One training attempt of a locked directory (teacher or student run): `config.yaml` first,
    the last attempt's `failed` cleared, then the body, which trains and ends with
    `train.loop.finish` (summary.yaml, then `done`). An exception from the body writes `failed`
    and propagates; KeyboardInterrupt and SIGTERM do not: an interrupted run resumes.
    `writer` is False on the ranks of a torchrun job other than 0, which write nothing."""
    run_dir = Path(run_dir)
    if writer:
        atomic_write_yaml(run_dir / CONFIG, resolved)
        (run_dir / FAILED).unlink(missing_ok=True)  # this attempt's outcome replaces the last one's
    try:
        yield
    except Exception as exc:
        if writer:
            mark_failed(run_dir, exc)
        raise


def mark_failed(run_dir: Path, exc: BaseException) -> None:
    """Write `run_dir/failed`: the error on its first line (the report's error column), then the
    traceback when the error is not a UserError. Never raises: failing to write the marker (a
    full disk) must not replace the error that stopped the run."""
    message = str(exc).strip()
    text = message if isinstance(exc, UserError) else f"{type(exc).__name__}: {message}"
    if not isinstance(exc, UserError):
        text += "\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with contextlib.suppress(Exception):
        atomic_write_text(Path(run_dir) / FAILED, text.rstrip("\n") + "\n")


# Settings that never change what a run produces, or change it only as another device does: the
# same arithmetic in another float order (`compile` fuses kernels; `device` itself is here).
_RUNTIME_ONLY = ("progress", "log_interval_s", "device", "eval_batch_size", "teacher_source", "seed", "tracker", "input_path", "compile")


# Settings read only by one optimizer or one schedule: left out of the key of the others.
_ONLY_FOR = {"momentum": ("optimizer", "sgd"), "pct_start": ("schedule", "onecycle"), "milestones": ("schedule", "multistep"), "gamma": ("schedule", "multistep")}
# Keys added after artifacts existed, left out at the values those runs had, so finished runs keep
# their directory (runs before channels_last trained in NCHW: channels_last=false finds them).
_ADDED_DEFAULTS = {"optimizer": "adamw", "schedule": "onecycle", "channels_last": False}


def _train_key(train: TrainConfig) -> dict[str, Any]:
    key = {k: v for k, v in dataclasses.asdict(train).items() if k not in _RUNTIME_ONLY}
    for name, (switch, value) in _ONLY_FOR.items():
        if key[switch] != value:
            del key[name]
    for name, default in _ADDED_DEFAULTS.items():
        if key[name] == default:
            del key[name]
    return key


def dataset_key(cfg: Config, data: Data) -> dict[str, Any]:
    """The dataset by content (fingerprint: labels, pixels, preprocessing), not by path."""
    d = cfg.dataset
    return {"name": d.name, "fingerprint": data.fingerprint, "val_size": d.val_size, "split_seed": d.split_seed}


def teacher_key(cfg: Config, data: Data) -> dict[str, Any]:
    """A trained teacher: the dataset, the model (a checkpoint by file name) and its training
    settings, the key every teacher had before checkpoints could be used as they are (kept, so
    those directories are found again). A checkpoint used as it is
    (`common.models.as_is.teacher_as_is`) is keyed by the dataset and the file's content
    instead: nothing is trained, so no training setting changes it, and the published files all
    share one name (ckpt_epoch_240.pth)."""
    t = cfg.teacher
    pretrained = Path(t.pretrained).name if t.pretrained else None
    model = {"name": t.name, "width": t.width, "pretrained": pretrained}
    if t.pretrained is not None:
        from common.models.as_is import teacher_as_is  # here: it needs torch, which stage 3 never imports

        if teacher_as_is(cfg, data):
            return {"dataset": dataset_key(cfg, data), "model": {**model, "as_is": True, "sha256": _file_sha256(t.pretrained)}}
    return {
        "dataset": dataset_key(cfg, data),
        "model": model,
        "train": {**_train_key(cfg.teacher_train), "seed": cfg.teacher_train.seed},
    }


def _file_sha256(path: str) -> str:
    file = Path(path).expanduser().resolve()
    stat = file.stat()
    return _sha256_of(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    """Cached per file version: a stage builds the teacher's paths many times."""
    del mtime_ns, size  # part of the cache key only
    return sha256_file(Path(path))


def teacher_id(cfg: Config, data: Data) -> str:
    """'<teacher name>-<thash>': the teacher's identity in run keys and records (with the model
    name's ':'); its directory's name is `dir_name` of it."""
    return f"{cfg.teacher.name}-{short_hash(teacher_key(cfg, data))}"


def teacher_dir(cfg: Config, data: Data) -> Path:
    return existing_dir(Path(cfg.artifacts) / cfg.dataset.name, teacher_id(cfg, data))


NAME_COLON = "--"  # what a model name's ':' becomes in a directory name (model names never hold '--')


def dir_name(name: str) -> str:
    """A teacher id or pair name as a portable directory name: 'tv:resnet18-1a2b3c4d' ->
    'tv--resnet18-1a2b3c4d'."""
    return name.replace(":", NAME_COLON)


def model_name_of(directory_name: str) -> str:
    """The inverse of `dir_name`; a name from a tree made before (with ':') is returned as it is."""
    return directory_name.replace(NAME_COLON, ":")


def existing_dir(parent: Path, name: str) -> Path:
    """parent/`dir_name(name)`, or parent/name where only that exists: a directory made before
    names were portable, used where it is (nothing is moved: a process of the previous version may
    still be writing into it), so its finished work is found and never redone."""
    portable = parent / dir_name(name)
    legacy = parent / name
    if legacy != portable and not portable.exists() and legacy.is_dir():
        return legacy
    return portable


def quality_key(cfg: Config) -> dict[str, Any]:
    """What S/I/E/Q depend on besides the teacher: the analysis pool and the subsets (METHOD 6.1, 6.2)."""
    p = cfg.profile
    return {"pool_size": p.pool_size, "subset_size": p.subset_size, "per_class_cap": p.per_class_cap, "seed": p.seed}


def quality_dir(cfg: Config, data: Data) -> Path:
    return teacher_dir(cfg, data) / f"quality-{short_hash(quality_key(cfg))}"


def profile_key(cfg: Config) -> dict[str, Any]:
    """The selection: S/I/E/Q's key plus k, the criterion and an explicit list (METHOD 0.4)."""
    p = cfg.profile
    return {**quality_key(cfg), "k": p.k, "criterion": p.criterion, "layers": p.layers}


def profile_dir(cfg: Config, data: Data) -> Path:
    return teacher_dir(cfg, data) / f"profile-{short_hash(profile_key(cfg))}"


def student_model_key(cfg: Config, data: Data, checkpoint_sha256: str) -> dict[str, Any]:
    """A trained student's checkpoint profiled as it is (`method.student_layers=Q`): keyed as an
    as-is teacher is (`teacher_key`), by the dataset and the file's content, so a profile of
    another checkpoint (another seed, other training settings) is never reused."""
    s = cfg.student
    return {"dataset": dataset_key(cfg, data),
            "model": {"name": s.name, "width": s.width, "pretrained": "student.pt", "as_is": True, "sha256": checkpoint_sha256}}


def student_model_dir(cfg: Config, data: Data, checkpoint_sha256: str) -> Path:
    """<artifacts>/<dataset>/<student>-<hash>/: beside the teachers, holding only quality-<qhash>/
    and profile-<phash>/ (no metrics.csv or config.yaml, so it is never listed as a teacher)."""
    return Path(cfg.artifacts) / cfg.dataset.name / dir_name(f"{cfg.student.name}-{short_hash(student_model_key(cfg, data, checkpoint_sha256))}")


def student_profile_key(cfg: Config) -> dict[str, Any]:
    """The student's selection: S/I/E/Q's key plus k; always the top-k by Q, never an explicit list."""
    return {**quality_key(cfg), "k": cfg.profile.k, "criterion": "Q", "layers": None}


def student_profile_dirs(cfg: Config, data: Data, checkpoint_sha256: str) -> tuple[Path, Path]:
    """(quality dir, profile dir) of a student checkpoint, keyed as a teacher's are."""
    root = student_model_dir(cfg, data, checkpoint_sha256)
    return root / f"quality-{short_hash(quality_key(cfg))}", root / f"profile-{short_hash(student_profile_key(cfg))}"


def run_key(cfg: Config, data: Data, method: dict[str, Any], teacher: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that changes a distillation run except its seed.

    teacher: None for a method without a teacher, else what the run takes from it (see
    `teacher_use`): the resolved layer indices, not the profile settings that chose them.
    """
    key: dict[str, Any] = {
        "dataset": dataset_key(cfg, data),
        "student": dataclasses.asdict(cfg.student),
        "method": method,
        "train": _train_key(cfg.train),
    }
    if teacher is not None:
        key["teacher"] = {"id": teacher_id(cfg, data), **teacher}
    return key


def teacher_use(teacher_layers: list[int], cache_dtype: str) -> dict[str, Any]:
    """What a run takes from its teacher: these layers' features (and the logits), read from a
    cache of this dtype (float16 rounding changes a run; a float32 cache equals the live teacher)."""
    return {"layers": list(teacher_layers), "cache_dtype": cache_dtype}


PAIR_SEP = "__"  # <teacher>__<student>: model names never hold it (registry names, tv:/timm: names)


def pair_name(teacher: str, student: str) -> str:
    return f"{teacher}{PAIR_SEP}{student}"


def pair_dir(cfg: Config) -> Path:
    return existing_dir(Path(cfg.artifacts) / cfg.dataset.name, pair_name(cfg.teacher.name, cfg.student.name))


def run_hash(cfg: Config, data: Data, method: dict[str, Any], teacher: dict[str, Any] | None) -> str:
    return short_hash(run_key(cfg, data, method, teacher))


def run_dir(cfg: Config, data: Data, method: dict[str, Any], teacher: dict[str, Any] | None, seed: int) -> Path:
    return pair_dir(cfg) / f"{method['name']}-{run_hash(cfg, data, method, teacher)}" / f"seed{seed}"


# ----------------------------------------------------------------------------- the inverse: reading the tree back


@dataclass(frozen=True)
class VariantDir:
    """<artifacts>/<dataset>/<teacher>__<student>/<method>-<hash>/: one run config, all its seeds.
    `teacher` and `student` are model names (with ':'), whichever way the directory spells them."""

    dataset: str
    teacher: str
    student: str
    method: str
    run_hash: str
    dir: Path

    @property
    def pair(self) -> str:
        return f"{self.teacher}{PAIR_SEP}{self.student}"

    def seed_dirs(self) -> dict[int, Path]:
        """seed -> seed<k>/ directory, for every seed directory present."""
        out = {}
        for child in _subdirs(self.dir):
            match = _SEED_DIR.fullmatch(child.name)
            if match:
                out[int(match.group(1))] = child
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class TeacherDir:
    """<artifacts>/<dataset>/<teacher>-<hash>/; `teacher` and `teacher_id` with the model name's ':'
    (`teacher_id` as runs record it), `dir` as it is on disk."""

    dataset: str
    teacher: str
    teacher_id: str
    run_hash: str
    dir: Path


_SEED_DIR = re.compile(r"seed(-?\d+)")


def split_hashed(name: str) -> tuple[str, str]:
    """'<name>-<hash8>' -> (name, hash8); names may hold '-' themselves."""
    head, sep, tail = name.rpartition("-")
    return (head, tail) if sep and head else (name, "")


def split_pair(name: str) -> tuple[str, str] | None:
    """'<teacher>__<student>' -> (teacher, student); None for any other directory name."""
    teacher, sep, student = name.partition(PAIR_SEP)
    return (teacher, student) if sep and teacher and student else None


def iter_variants(root: str | Path) -> Iterator[VariantDir]:
    """Every run-config directory under the artifacts `root`, sorted by dataset, pair, name."""
    for ds_dir in _subdirs(Path(root)):
        for pair in _subdirs(ds_dir):
            names = split_pair(model_name_of(pair.name))
            if names is None:
                continue
            for variant in _subdirs(pair):
                method, digest = split_hashed(variant.name)
                yield VariantDir(ds_dir.name, names[0], names[1], method, digest, variant)


def iter_teachers(root: str | Path) -> Iterator[TeacherDir]:
    """Every teacher directory under the artifacts `root` (holding a metrics.csv or config.yaml)."""
    for ds_dir in _subdirs(Path(root)):
        for tdir in _subdirs(ds_dir):
            if split_pair(tdir.name) is not None or not ((tdir / "metrics.csv").is_file() or (tdir / CONFIG).is_file()):
                continue
            name = model_name_of(tdir.name)
            teacher, digest = split_hashed(name)
            yield TeacherDir(ds_dir.name, teacher, name, digest, tdir)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []


def check_writable(root: str | Path, what: str = "artifacts") -> None:
    """Refuse, before any work, a `root` that cannot hold artifacts: a file where the directory
    should be (or above it), or a directory this process cannot write to.

    Nothing is created: a missing `root` is judged by its nearest existing ancestor, so a failed
    check leaves no new directory. Writability is tried with a real (deleted) temporary file,
    since `os.access` says yes to root on a read-only bind or /proc.
    """
    path = Path(root).expanduser()
    existing = path
    while not os.path.exists(existing) and existing != existing.parent:  # os.path: False, not an error, when unreadable
        existing = existing.parent
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{what} path {path} {where}; pass {what}=DIR with a directory (or a path where one can be created)")
    if not (os.access(existing, os.W_OK | os.X_OK) and _can_create_file(existing)):
        shown = f"{path} is" if existing == path else f"{path} cannot be created: {existing} is"
        raise ConfigError(f"{what} directory {shown} not writable; make it writable or pass {what}=DIR elsewhere")


def _can_create_file(directory: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True
