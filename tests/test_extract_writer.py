"""The feature cache's writer thread (common/cache/write.py `_stream_rows`): the same file as writing
inline, bounded memory, and errors in either thread ending the write cleanly.

Expected datasets and CRCs are re-derived here with numpy and zlib (never the code under test).
Threads that must end are joined with a timeout, so a hang fails the test instead of stalling it.
"""
from __future__ import annotations

import errno
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest
import torch

from common.cache import write as cache_write
from common.cache.reader import CHECKSUM, FeatureCache
from common.cache.write import write_h5
from common.cli import Terminated
from common.errors import CacheError, DiskFullError
from tests.stages import temp_files

N = 70
BATCH = 8  # 9 batches, the last one short
SHAPES = {"layer_3": (4, 3, 3), "logits": (10,), "labels": ()}
DTYPES = {"layer_3": "float16", "logits": "float32", "labels": "int64"}
META = {"teacher_sha256": "cd" * 32, "layers": [3]}
JOIN_S = 30.0  # seconds a writer may take to stop; a healthy one takes milliseconds


def rows(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer_3": (rng.standard_normal((N, *SHAPES["layer_3"])) * 300).astype(np.float32),
        "logits": rng.standard_normal((N, 10)).astype(np.float32),
        "labels": rng.integers(0, 10, N),
    }


def batches(data: dict[str, np.ndarray], fail_after: int | None = None, error: BaseException | None = None) -> Iterator[dict[str, torch.Tensor]]:
    for i, start in enumerate(range(0, N, BATCH)):
        if i == fail_after:
            raise error
        yield {k: torch.from_numpy(v[start : start + BATCH]) for k, v in data.items()}


def expected(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(DTYPES[k]) for k, v in data.items()}


def read_back(path: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, {k: int(f[k].attrs[CHECKSUM]) for k in f}


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(cache_write.WRITER_THREAD)]


def patch_writes(monkeypatch, before: Callable[[h5py.Dataset], None]) -> list[tuple[str, str]]:
    """Run `before(dataset)` ahead of every HDF5 dataset write; returns the (thread, dataset)
    of each write done so far."""
    real = h5py.Dataset.__setitem__
    log: list[tuple[str, str]] = []

    def setitem(self, key, value):
        before(self)
        real(self, key, value)
        log.append((threading.current_thread().name, self.name.lstrip("/")))

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    return log


def in_thread(fn: Callable[[], None]) -> BaseException | None:
    """The exception `fn` raised (None if none), run in a thread joined with a timeout."""
    raised: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(JOIN_S)
    assert not thread.is_alive(), f"write_h5 did not return within {JOIN_S} s"
    return raised[0]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_writer_thread_writes_what_inline_writes_write(tmp_path: Path, monkeypatch, depth: int) -> None:
    data = rows()
    inline, threaded = tmp_path / "inline.h5", tmp_path / "threaded.h5"
    monkeypatch.setattr(cache_write, "WRITE_QUEUE_DEPTH", 0)
    write_h5(inline, META, N, SHAPES, DTYPES, batches(data))
    monkeypatch.setattr(cache_write, "WRITE_QUEUE_DEPTH", depth)
    log = patch_writes(monkeypatch, lambda ds: time.sleep(0.002))  # a slow disk: the queue fills
    write_h5(threaded, META, N, SHAPES, DTYPES, batches(data))
    assert log and all(thread.startswith(cache_write.WRITER_THREAD) for thread, _ in log)
    want = expected(data)
    for path in (inline, threaded):
        arrays, crcs = read_back(path)
        assert sorted(arrays) == sorted(want)
        for name, array in want.items():
            assert arrays[name].dtype == array.dtype and arrays[name].tobytes() == array.tobytes(), name
            assert crcs[name] == zlib.crc32(array.tobytes()), name
        with FeatureCache(path) as opened:
            opened.verify()
            assert opened.meta == META
    assert writer_threads() == []


@pytest.mark.parametrize("depth", [1, 2])
def test_at_most_depth_batches_wait_for_the_writer(tmp_path: Path, monkeypatch, depth: int) -> None:
    monkeypatch.setattr(cache_write, "WRITE_QUEUE_DEPTH", depth)
    log = patch_writes(monkeypatch, lambda ds: time.sleep(0.01))
    lags = []

    def producer():
        for i, batch in enumerate(batches(rows())):
            written = sum(1 for _, name in log if name == "labels")  # labels: each batch's last write
            lags.append(i - written)  # batches handed over and not yet written
            yield batch

    write_h5(tmp_path / "f.h5", META, N, SHAPES, DTYPES, producer())
    assert max(lags) == depth  # the queue fills, and never past its depth


def test_float16_cast_matches_numpy_and_flags_only_real_overflow(tmp_path: Path) -> None:
    tricky = np.array([0.0, -0.0, 1e-8, 3e-8, 6e-8, 1e-5, 0.1, 1 / 3, 2049.0, 2051.0, 65504.0, 65519.0, -65519.0,
                       np.inf, -np.inf, np.nan], np.float32)
    rng = np.random.default_rng(1)
    values = np.concatenate([tricky, (rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 5, 4000)).astype(np.float32)])
    path = tmp_path / "f.h5"
    write_h5(path, {}, len(values), {"x": ()}, {"x": "float16"}, [{"x": torch.from_numpy(values)}])
    arrays, crcs = read_back(path)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert arrays["x"].tobytes() == want.tobytes() and crcs["x"] == zlib.crc32(want.tobytes())
    values[2500] = 65520.0  # the first float32 that rounds to inf
    with pytest.raises(CacheError, match="'x' overflows float16.*row 2500"):
        write_h5(path, {}, len(values), {"x": ()}, {"x": "float16"}, [{"x": values}])


@pytest.mark.parametrize("fault, raised", [
    (OSError(errno.ENOSPC, "No space left on device"), DiskFullError),
    (RuntimeError("HDF5 said no"), RuntimeError),
])
def test_an_error_in_the_writer_thread_surfaces_as_before_and_keeps_the_old_cache(
    tmp_path: Path, monkeypatch, fault: BaseException, raised: type[BaseException]
) -> None:
    path = tmp_path / "features.h5"
    write_h5(path, META, N, SHAPES, DTYPES, batches(rows(0)))
    old = path.read_bytes()
    calls = []

    def fail_on_third_batch(ds: h5py.Dataset) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) > 2 * len(SHAPES):
            raise fault

    monkeypatch.setattr(cache_write, "WRITE_QUEUE_DEPTH", 2)
    patch_writes(monkeypatch, fail_on_third_batch)
    with pytest.raises(raised) as err:
        write_h5(path, META, N, SHAPES, DTYPES, batches(rows(1)))
    assert calls[-1].startswith(cache_write.WRITER_THREAD)
    if raised is DiskFullError:
        assert f"disk full writing {path}" in str(err.value) and err.value.__cause__ is fault
    else:
        assert err.value is fault  # the writer's own exception, unchanged
    assert path.read_bytes() == old and temp_files(tmp_path) == [] and writer_threads() == []


@pytest.mark.parametrize("error", [RuntimeError("forward failed"), Terminated()])
def test_an_error_in_the_producer_stops_the_writer_and_removes_the_temp_file(tmp_path: Path, monkeypatch, error: BaseException) -> None:
    path = tmp_path / "features.h5"
    write_h5(path, META, N, SHAPES, DTYPES, batches(rows(0)))
    old = path.read_bytes()
    monkeypatch.setattr(cache_write, "WRITE_QUEUE_DEPTH", 2)
    log = patch_writes(monkeypatch, lambda ds: time.sleep(0.05))  # writes still queued when the producer fails
    fail_after = 4
    raised = in_thread(lambda: write_h5(path, META, N, SHAPES, DTYPES, batches(rows(1), fail_after, error)))
    assert raised is error
    written = sum(1 for _, name in log if name == "labels")
    assert written < fail_after  # the queued writes were dropped, not finished
    assert path.read_bytes() == old and temp_files(tmp_path) == [] and writer_threads() == []
