"""The feature cache's write path: `write_h5` streams batches into a new file of the format in
common/cache/reader.py (datasets, meta, per-dataset CRC-32, `complete` last), atomically.

Measured by `bench/bench_extract.py` (full-width ResNet34, 240 KiB of float16 per row): the
rows are cast here with torch (12x numpy's cast) and written by a writer thread while the teacher
computes the next batch. Contiguous and uncompressed stays the layout: lzf would store 0.68x the
bytes and gzip-1 0.57x, but they write at ~130 and ~48 MiB/s (a GPU teacher makes rows far
faster) and need chunks, which make a random row 10-300x slower to read.
"""
from __future__ import annotations

import json
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common.cache.reader import CHECKSUM, FORMAT_VERSION, FeatureCache
from common.errors import CacheError
from common.files import atomic_write
from common.runtime import IntervalLine

# Cast batches in the writer thread's hands (queued or being written) while the next batch is
# computed: bounds the writer's memory at this many batches in the cache dtype. Measured by
# bench/bench_extract.py; 0 writes each batch before the next is computed.
WRITE_QUEUE_DEPTH = 2
WRITER_THREAD = "h5-writer"


def _to_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _cast_checked(path: Path, name: str, rows: np.ndarray, dtype: np.dtype, first_row: int) -> np.ndarray:
    """`rows` as a C-contiguous `dtype` array; raises CacheError when a finite value overflows float16 to inf."""
    rows = np.ascontiguousarray(rows)
    out = _cast(rows, dtype)
    narrowed = dtype == np.float16 and np.issubdtype(rows.dtype, np.floating) and rows.dtype != np.float16
    if narrowed and out.size and not _within_float16(out):
        overflow = np.isinf(out) & np.isfinite(rows)
        if overflow.any():
            row = first_row + int(np.argwhere(overflow)[0][0])
            peak = float(np.abs(rows[np.isfinite(rows)]).max())
            raise CacheError(
                f"{path}: dataset '{name}' overflows float16 (|value| up to {peak:.3g} > 65504, "
                f"row {row}); set profile.cache_dtype=float32 and rerun"
            )
    return out


def _within_float16(out: np.ndarray) -> bool:
    """True when every value of the float16 `out` is finite (not NaN either: the caller's exact
    check then decides): one pass, no temporary, unlike abs().max()."""
    low, high = torch.aminmax(torch.from_numpy(out))
    return bool(-65504 <= low) and bool(high <= 65504)


def _cast(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.float16 and rows.dtype == np.float32:
        # torch's cast gives numpy's bytes (round to nearest even) 12x faster (vectorised,
        # threaded): 13 ms against 160 ms for a full-width ResNet34 batch of 256
        return torch.from_numpy(rows).half().numpy()
    with np.errstate(over="ignore"):  # overflow is reported by the caller, with the fix
        return rows.astype(dtype, copy=False)


def write_h5(
    path: Path,
    meta: dict,
    n: int,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    batches: Iterable[dict[str, torch.Tensor | np.ndarray]],
    *,
    copy_from: Path | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
    log_interval_s: float = 0.0,
) -> None:
    """Stream `batches` into a new cache at `path`, atomically (METHOD 0 item 9).

    `batches` yields consecutive rows in sample order: dicts mapping every name of `shapes` to
    that batch's rows; the file gets one dataset (n, *shapes[name]) of dtype dtypes[name] per
    name. A writer thread writes each batch while the next one is computed (`_stream_rows`):
    at most WRITE_QUEUE_DEPTH + 1 batches are in memory at a time. The file is written under a
    temp name in the same directory, `complete=True` is set last, then it is fsynced and
    renamed onto `path`: a killed run leaves the old file (or none); its temp file is removed on
    any exception (SIGTERM is one, see common.cli) or, after a SIGKILL, by the next write. Each
    dataset gets the CRC-32 of its bytes (attribute `crc32`). A full disk is a DiskFullError.

    copy_from: a valid cache with the same n whose datasets not in `shapes` are copied over
    (extends a cache with more layers without recomputing the old ones; may equal `path`).
    chunk_rows: None (default) stores datasets contiguous, which is what makes random-row
    gathers fast; an int stores them chunked by that many rows.
    progress: a bar on a terminal; log_interval_s: a line every that many seconds where stderr is no
    terminal, 0: none (common/runtime.py: IntervalLine).
    """
    path = Path(path)
    if set(dtypes) != set(shapes):
        raise ValueError(f"shapes and dtypes name different datasets: {sorted(shapes)} vs {sorted(dtypes)}")
    bad = [name for name in shapes if "/" in name or not name]
    if bad:
        raise ValueError(f"dataset names must be non-empty and contain no '/': {bad}")
    def fill(tmp: Path) -> None:
        with h5py.File(tmp, "w") as out:
            if copy_from is not None:
                _copy_datasets(Path(copy_from), out, n, skip=set(shapes))
            datasets = {}
            for name, shape in shapes.items():
                chunks = (min(chunk_rows, n), *shape) if chunk_rows and n > 0 else None
                datasets[name] = out.create_dataset(name, (n, *shape), dtype=np.dtype(dtypes[name]), chunks=chunks)
            for name, crc in _stream_rows(path, datasets, n, batches, progress, log_interval_s).items():
                datasets[name].attrs[CHECKSUM] = crc
            out.attrs["meta"] = json.dumps(meta, default=str, sort_keys=True)
            out.attrs["n"] = n
            out.attrs["format_version"] = FORMAT_VERSION
            out.flush()
            out.attrs["complete"] = True  # set last: a reader trusts nothing without it
            out.flush()

    atomic_write(path, fill)  # the one temp-file scheme of every writer (common/files.py)


def _copy_datasets(source: Path, out: h5py.File, n: int, skip: set[str]) -> None:
    with FeatureCache(source) as old:
        if old.n != n:
            raise CacheError(f"{source} holds {old.n} rows, not {n}; it cannot be extended, delete it and rerun")
        for name in old.names:
            if name not in skip:
                old.copy_to(out, name)


def _stream_rows(
    path: Path,
    datasets: dict[str, h5py.Dataset],
    n: int,
    batches: Iterable[dict[str, torch.Tensor | np.ndarray]],
    progress: bool,
    log_interval_s: float = 0.0,
) -> dict[str, int]:
    """Write the rows in order; returns each dataset's CRC-32 (rows arrive in file order, so the
    running CRC over the written bytes is the CRC of the whole dataset).

    This thread checks and casts each batch; one writer thread writes it and updates the CRCs,
    in batch order, while the next batch is computed (torch releases the GIL). At most
    WRITE_QUEUE_DEPTH cast batches wait for the writer. An error in the writer is raised here,
    unchanged, at the next batch; any exception here cancels the queued writes and waits for
    the one under way, so the caller may close and delete the file.
    """
    crcs = {name: 0 for name in datasets}
    # read once: h5py serialises every call on one lock, which the writer holds while it writes
    layout = {name: (ds.shape[1:], ds.dtype) for name, ds in datasets.items()}

    def write(rows: dict[str, np.ndarray], start: int, count: int) -> int:
        for name, array in rows.items():
            datasets[name][start : start + count] = array
            crcs[name] = zlib.crc32(array, crcs[name])  # a C-contiguous buffer: its bytes as stored
        return count

    start = 0
    written = 0
    pending: deque[Future[int]] = deque()
    line = IntervalLine(path.name, n, log_interval_s, unit="rows", what="row")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=WRITER_THREAD) as writer, \
            tqdm(total=n, unit="rows", desc=path.name, disable=None if progress else True) as bar:  # None: off when not a terminal
        try:
            for batch in batches:
                rows, count = _batch_rows(path, layout, n, batch, start)
                pending.append(writer.submit(write, rows, start, count))
                start += count
                while pending and (len(pending) > WRITE_QUEUE_DEPTH or pending[0].done()):
                    written += _written(bar, pending.popleft())
                line.step(written, written)
            while pending:
                written += _written(bar, pending.popleft())
        finally:
            for future in pending:
                future.cancel()
    if start != n:
        raise ValueError(f"batches yielded {start} rows, expected n={n}")
    return crcs


def _written(bar: tqdm, future: Future[int]) -> int:
    """The rows a finished write wrote, counted on the bar; re-raises the writer's error."""
    count = future.result()
    bar.update(count)
    return count


def _batch_rows(
    path: Path, layout: dict[str, tuple[tuple[int, ...], np.dtype]], n: int, batch: dict[str, torch.Tensor | np.ndarray], start: int
) -> tuple[dict[str, np.ndarray], int]:
    """One batch checked against the datasets' `layout` (name -> row shape, dtype) and n, and
    cast to their dtypes; with its row count."""
    if set(batch) != set(layout):
        raise ValueError(f"batch names {sorted(batch)} differ from the datasets {sorted(layout)}")
    arrays = {name: _to_numpy(value) for name, value in batch.items()}
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"batch datasets have different row counts: { {k: len(a) for k, a in arrays.items()} }")
    count = counts.pop()
    if start + count > n:
        raise ValueError(f"batches yield more than n={n} rows")
    for name, array in arrays.items():
        if array.shape[1:] != layout[name][0]:
            raise ValueError(f"dataset '{name}' rows have shape {array.shape[1:]}, expected {layout[name][0]}")
    return {name: _cast_checked(path, name, array, layout[name][1], start) for name, array in arrays.items()}, count
