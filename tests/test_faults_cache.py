"""Faults of the artifacts themselves: damaged or stale caches, a damaged teacher checkpoint,
writers killed half-way (SIGTERM and SIGKILL), crashed / running / interrupted runs in the
report, and a full disk.

A tiny finished teacher with its profile and feature cache is built once for the module; every
test works on its own copy of that artifacts tree. Subprocesses run with one thread each
(a shared 2-core machine) and import the real modules, so a SIGTERM reaches the real handler.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest
import torch

from common import distill
from common.artifacts import layout as artifacts
from common.artifacts import discovery
from common.profile import runner as profile
from common.report import runner as report
from common.cache.reader import CHECKSUM, FeatureCache
from common.cache.write import write_h5
from common.config import Config, load_config
from common.data.registry import Data, load_data
from common.errors import CacheError, DiskFullError
from common.files import atomic_torch_save, atomic_write_text, file_lock
from common.profile.features import features_path
from common.profile.manifest import load_manifest
from common.profile.teacher import ensure_teacher, load_teacher
from tests.fakedata import make_fashion_mnist
from tests.stages import ENV, ROOT, one_error_line, run_stage, temp_files

pytestmark = pytest.mark.stages  # starts the stage scripts or runs whole stages

TIMEOUT_S = 120  # per subprocess; a healthy one takes a few seconds


def overrides(data_root: Path, arts: Path, *extra: str) -> list[str]:
    return [
        f"dataset.root={data_root}", f"artifacts={arts}",
        "teacher.name=resnet18", "teacher.width=0.125", "student.name=resnet9", "student.width=0.125",
        "teacher_train.epochs=1", "teacher_train.batch_size=32", "train.epochs=1", "train.batch_size=32",
        "profile.subset_size=100", "profile.per_class_cap=10", "profile.batch_size=64",
        "teacher_train.progress=false", "train.progress=false", "profile.progress=false", *extra,
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Data]:
    """(data root, a finished artifacts tree: teacher + profile + feature cache, the data)."""
    tmp = tmp_path_factory.mktemp("faults_cache")
    make_fashion_mnist(tmp / "fmnist", n_train=200, n_test=60, seed=0)
    cfg = load_config(None, overrides(tmp / "fmnist", tmp / "pristine"))
    data = load_data(cfg.dataset)
    profile.run(cfg, data)
    return tmp / "fmnist", tmp / "pristine", data


class Tree:
    """One test's copy of the finished artifacts tree."""

    def __init__(self, data_root: Path, arts: Path, data: Data) -> None:
        self.data_root, self.arts, self.data = data_root, arts, data

    def cfg(self, *extra: str) -> Config:
        return load_config(None, overrides(self.data_root, self.arts, *extra))

    def args(self, *extra: str) -> list[str]:
        return ["--quiet", *overrides(self.data_root, self.arts, *extra)]

    @property
    def features(self) -> Path:
        return features_path(self.cfg(), self.data)

    @property
    def teacher_pt(self) -> Path:
        return artifacts.teacher_dir(self.cfg(), self.data) / "teacher.pt"

    def selected(self) -> list[int]:
        return load_manifest(self.cfg(), self.data).selected


@pytest.fixture
def tree(built, tmp_path) -> Tree:
    data_root, pristine, data = built
    shutil.copytree(pristine, tmp_path / "artifacts")
    return Tree(data_root, tmp_path / "artifacts", data)




def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- damaged / stale caches


def _edit_meta(path: Path, edit: Callable[[dict], None]) -> None:
    with h5py.File(path, "a") as f:
        meta = json.loads(f.attrs["meta"])
        edit(meta)
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)


def truncated(tree: Tree) -> str:
    path = tree.features
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    return "incomplete or corrupt"


def wrong_shape(tree: Tree) -> str:
    """A self-consistent file (meta, checksums) whose selected layer has half the teacher's
    channels, as a cache of a narrower teacher copied into place would."""
    path, name = tree.features, f"layer_{tree.selected()[0]}"
    with h5py.File(path, "r") as f:
        meta = json.loads(f.attrs["meta"])
        arrays = {k: f[k][:] for k in f}
    arrays[name] = np.ascontiguousarray(arrays[name][:, : arrays[name].shape[1] // 2])
    meta["shapes"][name.split("_")[1]] = list(arrays[name].shape[1:])
    path.unlink()
    write_h5(path, meta, len(arrays[name]), {k: a.shape[1:] for k, a in arrays.items()},
             {k: str(a.dtype) for k, a in arrays.items()}, [arrays])
    return f"cache field '{name}' has rows of shape"


def other_checkpoint(tree: Tree) -> str:
    _edit_meta(tree.features, lambda meta: meta.update(teacher_sha256="0" * 64))
    return "cache field 'teacher_sha256' differs"


def other_preprocessing(tree: Tree) -> str:
    _edit_meta(tree.features, lambda meta: meta["preprocessing"].update(mean=[0.5]))
    return "cache field 'preprocessing' differs"


def flipped_byte(tree: Tree) -> str:
    """Silent corruption: one byte inside a selected layer's data; every metadata check passes."""
    name = f"layer_{tree.selected()[0]}"
    with h5py.File(tree.features, "r") as f:
        ds = f[name]
        offset = ds.id.get_offset() + ds.id.get_storage_size() // 2
    with open(tree.features, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))
    return f"dataset '{name}' is corrupt"


def old_format(tree: Tree) -> str:
    """A file written before checksums existed: treated as stale, rebuilt by stage 1."""
    with h5py.File(tree.features, "a") as f:
        f.attrs["format_version"] = 1
        for ds in f.values():
            del ds.attrs[CHECKSUM]
    return "written before per-dataset checksums"


@pytest.mark.parametrize("damage", [truncated, wrong_shape, other_checkpoint, other_preprocessing, flipped_byte, old_format])
def test_damaged_or_stale_cache_is_refused_by_stage2_and_rebuilt_by_stage1(tree: Tree, damage) -> None:
    words = damage(tree)
    cfg = tree.cfg("method.name=ours")
    with pytest.raises(CacheError) as err:  # before any training step
        distill.run(cfg, seeds=[0], data=tree.data)
    message = str(err.value)
    assert str(tree.features) in message and words in message and "make profile" in message, message
    assert not list(tree.arts.glob("*/*__*/*/seed0/metrics.csv")) and not list(tree.arts.rglob("failed"))
    profile.run(tree.cfg(), tree.data)  # the command the message names: rebuilds the cache
    with FeatureCache(tree.features) as cache:
        cache.verify()
        assert cache.meta["teacher_sha256"] == load_teacher(cfg, tree.data, torch.device("cpu"))[1]
        assert cache.meta["preprocessing"]["mean"] == tree.data.mean.tolist()
        assert cache.covers(tree.data.train_indices)


def test_flipped_byte_is_one_error_line_naming_file_field_and_command(tree: Tree) -> None:
    words = flipped_byte(tree)
    line = one_error_line(run_stage("s2", tree.args("method.name=ours")))
    assert str(tree.features) in line and words in line and "make profile" in line, line
    assert not list(tree.arts.rglob("student.pt"))
    profile.run(tree.cfg(), tree.data)
    result = distill.run(tree.cfg("method.name=ours"), seeds=[0], data=tree.data)[0]
    assert (result.dir / "done").exists()


@pytest.mark.parametrize("garbage", [b"this is not a checkpoint\n" * 40, "truncated"])
def test_garbage_teacher_checkpoint_is_a_clear_error_and_retraining_fixes_it(tree: Tree, garbage) -> None:
    good = tree.teacher_pt.read_bytes()
    tree.teacher_pt.write_bytes(good[: len(good) // 2] if garbage == "truncated" else garbage)
    for call in (lambda: distill.run(tree.cfg("method.name=ours"), seeds=[0], data=tree.data),  # stage 2
                 lambda: profile.run(tree.cfg(), tree.data)):  # stage 1
        with pytest.raises(CacheError) as err:
            call()
        message = str(err.value)
        assert f"teacher checkpoint {tree.teacher_pt} is damaged" in message and "make teacher" in message, message
    tree.teacher_pt.unlink()  # what the message says to do
    ensure_teacher(tree.cfg(), tree.data)
    load_teacher(tree.cfg(), tree.data, torch.device("cpu"))


# ----------------------------------------------------------------------------- writers killed half-way

# Writes a new version of an artifact that already exists and stops at `point` (prints "ready"
# and sleeps) so the test can kill it there. Runs through cli.main, as the stage scripts do.
WRITER = r"""
import os, sys, time
from pathlib import Path
import numpy as np
import torch
from common import cli
from common.cache.write import write_h5
from common.files import atomic_torch_save, atomic_write

point, target = sys.argv[1], Path(sys.argv[2])

def ready():
    print("ready", flush=True)
    time.sleep(120)

def body():
    if point.endswith("rename"):  # stop after the temp file is complete, before the rename
        real = os.fsync
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
                ready()
            real(fd)
        os.fsync = fsync
    if point.startswith("h5"):
        def batches():
            for i in range(5):
                yield {"x": np.full((10, 1000), i + 1, np.float32)}
                if point == "h5-stream" and i == 1:
                    ready()
        write_h5(target, {"v": "new"}, 50, {"x": (1000,)}, {"x": "float32"}, batches())
    elif point == "text-write":
        def write(tmp):
            with open(tmp, "w") as fh:
                fh.write("new, half written")
                fh.flush()
                ready()
        atomic_write(target, write)
    elif point == "torch-rename":
        atomic_torch_save(target, {"v": torch.arange(1000)})
    return 0

cli.main(body)
"""

POINTS = {  # kill point -> (artifact name, writes the old version / the next version in-process)
    "h5-stream": ("f.h5", lambda p, v: write_h5(p, {"v": v}, 50, {"x": (1000,)}, {"x": "float32"}, [{"x": np.zeros((50, 1000), np.float32)}])),
    "h5-rename": ("f.h5", lambda p, v: write_h5(p, {"v": v}, 50, {"x": (1000,)}, {"x": "float32"}, [{"x": np.zeros((50, 1000), np.float32)}])),
    "text-write": ("metrics.csv", lambda p, v: atomic_write_text(p, f"{v}\n")),
    "torch-rename": ("checkpoint.pt", lambda p, v: atomic_torch_save(p, {"v": v})),
}


def _valid(path: Path) -> None:
    """The artifact opens and checks out (the old version: the killed writer never renamed)."""
    if path.suffix == ".h5":
        with FeatureCache(path) as cache:
            cache.verify()
            assert cache.meta == {"v": "old"}
    elif path.suffix == ".pt":
        assert torch.load(path, weights_only=True) == {"v": "old"}
    else:
        assert path.read_text() == "old\n"


def _wait_ready(proc: subprocess.Popen, timeout: float = 90) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"writer never got to its kill point: {line!r} {proc.communicate()[1]}")


def test_killed_writers_leave_the_old_artifact_and_sigterm_leaves_no_temp_file(tmp_path: Path) -> None:
    """Every kill point x SIGTERM/SIGKILL, all writers started at once (imports dominate)."""
    cases = [(point, sig) for point in POINTS for sig in (signal.SIGTERM, signal.SIGKILL)]
    procs = {}
    for point, sig in cases:
        directory = tmp_path / f"{point}-{sig.name}"
        directory.mkdir()
        name, write = POINTS[point]
        write(directory / name, "old")
        before = (directory / name).read_bytes()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, point, str(directory / name)], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[(point, sig)] = (proc, directory / name, before)
    for (point, sig), (proc, path, _before) in procs.items():
        _wait_ready(proc)
        assert temp_files(path.parent), f"{point}: no temp file at the kill point"
        proc.send_signal(sig)
    for (point, sig), (proc, path, before) in procs.items():
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
        assert path.read_bytes() == before, f"{point} {sig.name}: the artifact changed"
        _valid(path)
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "Traceback" not in stderr, stderr
            assert [line for line in stderr.splitlines() if line.startswith("interrupted:")], stderr
            assert temp_files(path.parent) == [], f"{point}: SIGTERM left {temp_files(path.parent)}"
        else:
            assert proc.returncode == -signal.SIGKILL
            assert temp_files(path.parent), f"{point}: SIGKILL cannot clean up, yet no temp file is left"
            POINTS[point][1](path, "next")  # the next writer of the artifact removes the dead writer's temp file
            assert temp_files(path.parent) == [], f"{point}: stale {temp_files(path.parent)}"


def _wait_for(find: Callable[[], list[Path]], proc: subprocess.Popen, timeout: float = 90) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"stage 2 ended early: {proc.communicate()[1]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("stage 2 never finished an epoch")


def _status(arts: Path, seed_dir: Path) -> tuple[str, str, int]:
    runs = discovery.find_runs(arts)
    row = runs[runs["path"] == str(seed_dir)].iloc[0]
    return row["status"], row["error"], int(row["epochs"])


def test_stage2_sigterm_is_a_clean_exit_and_the_report_tells_running_from_interrupted(tree: Tree) -> None:
    proc = subprocess.Popen([sys.executable, "stage2_distill.py", *tree.args("method.name=ce", "train.epochs=100")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = _wait_for(lambda: list(tree.arts.glob("*/*__*/ce-*/seed0/checkpoint.pt")), proc)
        seed_dir = checkpoint.parent
        assert _status(tree.arts, seed_dir)[0] == "running"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("interrupted:")], stderr
    assert temp_files(tree.arts) == []
    resume_from = torch.load(seed_dir / "checkpoint.pt", weights_only=False)["epoch"]  # whole, resumable
    status, error, epochs = _status(tree.arts, seed_dir)
    assert (status, error) == ("interrupted", "") and 1 <= resume_from <= epochs <= resume_from + 1
    out = report.run(tree.arts, tree.arts / "reports")
    assert out["accuracy"].empty  # never averaged
    assert list(out["unfinished"]["status"]) == ["interrupted"]


def test_report_tells_a_crash_with_its_error_from_running_and_interrupted_runs(tree: Tree, monkeypatch) -> None:
    import common.train.loop as train_mod

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in evaluation")

    monkeypatch.setattr(train_mod, "evaluate", crash)
    cfg = tree.cfg("method.name=ce")
    with pytest.raises(RuntimeError, match="simulated crash"):  # not a UserError: marked failed all the same
        distill.run(cfg, seeds=[0], data=tree.data)
    crashed = next(tree.arts.glob("*/*__*/ce-*/seed0"))
    assert (crashed / "failed").read_text().splitlines()[0] == "RuntimeError: simulated crash in evaluation"
    running, interrupted = crashed.parent / "seed1", crashed.parent / "seed2"
    for seed_dir in (running, interrupted):
        seed_dir.mkdir()
        shutil.copy(crashed / "config.yaml", seed_dir / "config.yaml")
    (interrupted / "metrics.csv").write_text("epoch,test_acc,elapsed_s\n1,50.0,1.0\n2,55.0,2.0\n")
    (interrupted / ".lock").touch()  # a lock file nobody holds: its process is gone
    with file_lock(running / ".lock"):  # held, as stage 2 holds it while it trains
        assert _status(tree.arts, running)[0] == "running"
        out = report.run(tree.arts, tree.arts / "reports")
    statuses = {Path(r.path).name: (r.status, r.error, r.epochs) for r in out["unfinished"].itertuples()}
    assert statuses == {
        "seed0": ("failed", "RuntimeError: simulated crash in evaluation", 0),
        "seed1": ("running", "", 0),
        "seed2": ("interrupted", "", 2),
    }
    markdown = (tree.arts / "reports" / "unfinished.md").read_text()
    assert "RuntimeError: simulated crash in evaluation" in markdown and "running" in markdown and "interrupted" in markdown
    assert out["accuracy"].empty
    # A teacher that crashes is marked the same way.
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_teacher(tree.cfg("teacher_train.epochs=2"), tree.data)
    teachers = discovery.find_teachers(tree.arts)
    assert list(teachers.loc[teachers["status"] != "finished", "error"]) == ["RuntimeError: simulated crash in evaluation"]


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 64 MiB tmpfs (None where mounting is not allowed: the test then simulates ENOSPC)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> None:
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(0, free - leave))


def test_disk_full_is_one_line_leaves_no_partial_file_and_keeps_earlier_artifacts(tree: Tree, small_disk, monkeypatch) -> None:
    if small_disk is None:
        _disk_full_simulated(tree, monkeypatch)
        return
    shutil.copytree(tree.arts, small_disk / "artifacts")
    tree = Tree(tree.data_root, small_disk / "artifacts", tree.data)
    _fill(small_disk, leave=4 << 20)  # the float32 cache needs ~22 MiB
    before = snapshot(small_disk)
    line = one_error_line(run_stage("s1", tree.args("profile.cache_dtype=float32")))
    new_cache = features_path(tree.cfg("profile.cache_dtype=float32"), tree.data)
    assert "disk full" in line and str(new_cache) in line and str(small_disk) in line, line
    assert not new_cache.exists() and temp_files(small_disk) == []
    after = snapshot(small_disk)
    assert {k: after[k] for k in before} == before  # earlier artifacts byte-identical
    assert all(Path(k).suffix == ".lock" for k in set(after) - set(before)), set(after) - set(before)
    # torch.save reports a full disk only as "unexpected pos": still a DiskFullError, old file kept
    checkpoint = small_disk / "checkpoint.pt"
    atomic_torch_save(checkpoint, {"epoch": 1})
    old = checkpoint.read_bytes()
    with pytest.raises(DiskFullError, match=f"disk full writing {checkpoint}"):
        atomic_torch_save(checkpoint, {"epoch": 2, "weights": torch.zeros(4 << 20)})
    assert checkpoint.read_bytes() == old and temp_files(small_disk) == []
    with pytest.raises(DiskFullError, match="disk full writing"):
        atomic_write_text(small_disk / "metrics.csv", "x" * (8 << 20))
    assert not (small_disk / "metrics.csv").exists() and temp_files(small_disk) == []


def _disk_full_simulated(tree: Tree, monkeypatch) -> None:
    """No tmpfs here: the writers' own calls raise ENOSPC as the kernel would."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = snapshot(tree.arts)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", no_space)
    cfg = tree.cfg("profile.cache_dtype=float32")
    with pytest.raises(DiskFullError, match="disk full writing .*features-float32.h5"):
        profile.run(cfg, tree.data)
    after = snapshot(tree.arts)
    assert {k: after[k] for k in before} == before and temp_files(tree.arts) == []
    assert all(Path(k).suffix == ".lock" for k in set(after) - set(before))
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError):
        atomic_torch_save(tree.arts / "checkpoint.pt", {"epoch": 1})
    assert temp_files(tree.arts) == [] and not (tree.arts / "checkpoint.pt").exists()
