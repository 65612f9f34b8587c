"""HDF5 feature cache: atomic streaming writer, validated reader, fast row gathers (METHOD 0 item 9).

Stage 1 writes the teacher's selected-layer features for the un-augmented training split (plus
logits and labels) into one HDF5 file, and the all-layer features of the Q subsets into another;
stage 2 reads mini-batch rows of it every step for many epochs.

File format: one flat HDF5 dataset of shape (n, *shape) per name, attributes `meta` (a JSON
string: whatever keys the caller passes, checked by `FeatureCache.check`), `n`, `format_version`
and `complete` (set last, so a file without it is never trusted). Every dataset carries a `crc32`
attribute: the CRC-32 of its bytes in row order, computed by the writer as rows stream in, so
silent corruption (a flipped byte no metadata check sees) is found when the dataset is read:
for free when it is loaded into RAM whole (the bytes are read anyway), by one streaming pass
(`verify`) before a partial load or disk reads. Files of format 1 (no checksums) are refused as
stale; stage 1 rebuilds them. A cache of some rows of the training split (the students'
training subset) has a dataset `positions`: the training-split position of each row. Rows are
stored in a seeded random order of positions (`storage_order`), so that contiguous disk blocks
mix classes even when the dataset is stored class by class (Tiny ImageNet). Readers address
rows by training-split position (`gather`, `load`), and asking for a position the file does not
hold is a CacheError, never a wrong row.

Read path, measured by `bench/bench_cache_read.py`: datasets are stored *contiguous* (not
chunked) because HDF5 point selections on chunked datasets cost tens of ms per 128-row batch
(~50 s per 60 000-row epoch) while the same gather on a contiguous dataset costs ~1-3 ms. The
default is to load the datasets into RAM (`FeatureCache.load`), which makes a gather a plain
`index_select`; when they do not fit, `epoch_batches(block_size=...)` keeps each batch inside one
or two contiguous regions of the file.

Write path, measured by `bench/bench_extract.py` (full-width ResNet34, 240 KiB of float16 per
row): the rows are cast here with torch (12x numpy's cast) and written by a writer thread while
the teacher computes the next batch. Contiguous and uncompressed stays the layout: lzf would
store 0.68x the bytes and gzip-1 0.57x, but they write at ~130 and ~48 MiB/s (a GPU teacher
makes rows far faster) and need chunks, which make a random row 10-300x slower to read.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common.errors import CacheError, ConfigError
from common.io import disk_full_error, is_disk_full, remove_stale_tmp, tmp_path

FORMAT_VERSION = 2  # 2: per-dataset crc32 attributes
CHECKSUM = "crc32"  # dataset attribute: zlib.crc32 of the dataset's bytes in row order
VERIFY_BLOCK_BYTES = 64 << 20  # bytes read per step of a streaming `verify` pass (bounded memory)
POSITIONS = "positions"  # dataset: training-split position of each row (rows in storage_order)
DEFAULT_REBUILD_HINT = "rerun stage 1 (stage1_profile_teacher.py)"
# A sorted gather reads one slice instead of a point selection when the rows fill at least this
# share of their span (measured: a slice wins only for nearly contiguous rows).
SLICE_FILL = 0.8
# Cast batches in the writer thread's hands (queued or being written) while the next batch is
# computed: bounds the writer's memory at this many batches in the cache dtype. Measured by
# bench/bench_extract.py; 0 writes each batch before the next is computed.
WRITE_QUEUE_DEPTH = 2
WRITER_THREAD = "h5-writer"




def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _json_normal(value: Any) -> Any:
    """The value as it reads back from the JSON meta attribute (tuples -> lists, Paths -> str)."""
    return json.loads(json.dumps(value, default=str))


_MISSING = object()


def _short(value: Any, limit: int = 60) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """
    path = Path(path)
    if set(dtypes) != set(shapes):
        raise ValueError(f"shapes and dtypes name different datasets: {sorted(shapes)} vs {sorted(dtypes)}")
    bad = [name for name in shapes if "/" in name or not name]
    if bad:
        raise ValueError(f"dataset names must be non-empty and contain no '/': {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)  # one temp-file scheme for every writer (common/io.py)
    tmp = tmp_path(path)
    try:
        with h5py.File(tmp, "w") as out:
            if copy_from is not None:
                _copy_datasets(Path(copy_from), out, n, skip=set(shapes))
            datasets = {}
            for name, shape in shapes.items():
                chunks = (min(chunk_rows, n), *shape) if chunk_rows and n > 0 else None
                datasets[name] = out.create_dataset(name, (n, *shape), dtype=np.dtype(dtypes[name]), chunks=chunks)
            for name, crc in _stream_rows(path, datasets, n, batches, progress).items():
                datasets[name].attrs[CHECKSUM] = crc
            out.attrs["meta"] = json.dumps(meta, default=str, sort_keys=True)
            out.attrs["n"] = n
            out.attrs["format_version"] = FORMAT_VERSION
            out.flush()
            out.attrs["complete"] = True
            out.flush()
        _fsync(tmp)
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


def _copy_datasets(source: Path, out: h5py.File, n: int, skip: set[str]) -> None:
    with FeatureCache(source) as old:
        if old.n != n:
            raise CacheError(f"{source} holds {old.n} rows, not {n}; it cannot be extended, delete it and rerun")
        for name in old.names:
            if name not in skip:
                old._file.copy(old._file[name], out, name=name)


def _stream_rows(
    path: Path,
    datasets: dict[str, h5py.Dataset],
    n: int,
    batches: Iterable[dict[str, torch.Tensor | np.ndarray]],
    progress: bool,
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
    pending: deque[Future[int]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=WRITER_THREAD) as writer, \
            tqdm(total=n, unit="rows", desc=path.name, disable=None if progress else True) as bar:  # None: off when not a terminal
        try:
            for batch in batches:
                rows, count = _batch_rows(path, layout, n, batch, start)
                pending.append(writer.submit(write, rows, start, count))
                start += count
                while pending and (len(pending) > WRITE_QUEUE_DEPTH or pending[0].done()):
                    bar.update(pending.popleft().result())  # re-raises the writer's error
            while pending:
                bar.update(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()
    if start != n:
        raise ValueError(f"batches yielded {start} rows, expected n={n}")
    return crcs


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


class FeatureCache:
    """Read-only view of a cache written by `write_h5`: meta, checks, RAM load, row gathers.

    Checksums: `load` checks every dataset it reads against its `crc32` (inline for a whole
    dataset, by one streaming `verify` pass before a partial load); disk readers call `verify`
    once before their first `gather` (CachedTeacher does). `verify=False` skips all of it (for
    benchmarks and forensics only).
    """

    def __init__(self, path: Path, *, rebuild_hint: str = DEFAULT_REBUILD_HINT, verify: bool = True) -> None:
        """Open `path`; CacheError (naming the file and `rebuild_hint`) if missing, corrupt,
        incomplete, of an older format, or if a dataset's row count or shape disagrees with the
        file's own metadata. Opening reads only metadata and the small `positions` dataset."""
        self.path = Path(path)
        self._ram: dict[str, torch.Tensor] = {}
        self._ram_position: torch.Tensor | None = None  # row -> RAM position when a subset is loaded
        self._check_sums = verify
        self._verified: set[str] = set()
        if not self.path.is_file():
            raise CacheError(f"{self.path} does not exist; {rebuild_hint}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            reason = str(err).splitlines()[0][:120]
            raise CacheError(f"{self.path} is incomplete or corrupt ({reason}); delete it and {rebuild_hint}") from err
        try:
            if not self._file.attrs.get("complete", False):
                raise CacheError(f"{self.path} is incomplete or corrupt (no complete flag); delete it and {rebuild_hint}")
            self.meta: dict = json.loads(self._file.attrs["meta"])
            self.n: int = int(self._file.attrs["n"])
            self.names: list[str] = sorted(k for k, v in self._file.items() if isinstance(v, h5py.Dataset))
            self._check_layout(rebuild_hint)
        except CacheError:
            self._file.close()
            raise
        except (KeyError, ValueError, OSError) as err:
            self._file.close()
            raise CacheError(
                f"{self.path} is incomplete or corrupt ({type(err).__name__}: {str(err)[:80]}); "
                f"delete it and {rebuild_hint}"
            ) from err
        self._rebuild_hint = rebuild_hint
        # training-split position of each row; None: row i is position i (a whole-split cache)
        self.positions: torch.Tensor | None = None
        if POSITIONS in self.names:
            try:
                self.positions = torch.from_numpy(self._read_whole(POSITIONS).astype(np.int64))
            except BaseException:
                self._file.close()
                raise
            # rows may be stored in any order (stage 1 shuffles them): look positions up sorted
            self._sorted_positions, self._row_of_sorted = torch.sort(self.positions)

    def _check_layout(self, rebuild_hint: str) -> None:
        """Format version, a checksum on every dataset, n rows each, and the shapes `meta` records."""
        version = int(self._file.attrs.get("format_version", 0))
        if version < FORMAT_VERSION:
            raise CacheError(
                f"{self.path} was written before per-dataset checksums (format {version}, now {FORMAT_VERSION}) "
                f"and is treated as stale; {rebuild_hint}"
            )
        recorded = {f"layer_{k}": tuple(v) for k, v in (self.meta.get("shapes") or {}).items()}
        for name in self.names:
            ds = self._file[name]
            if CHECKSUM not in ds.attrs:
                raise CacheError(f"{self.path}: dataset '{name}' has no {CHECKSUM} checksum (incomplete or corrupt); {rebuild_hint}")
            if not ds.shape or ds.shape[0] != self.n:
                raise CacheError(
                    f"{self.path}: dataset '{name}' has shape {_dims(ds.shape)} but the file holds {self.n} rows "
                    f"(corrupt); {rebuild_hint}"
                )
            want = recorded.get(name)
            if want is not None and tuple(ds.shape[1:]) != want:
                raise CacheError(
                    f"{self.path}: dataset '{name}' has rows of shape {_dims(ds.shape[1:])}, its metadata says "
                    f"{_dims(want)} (corrupt); {rebuild_hint}"
                )

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Check `names` (default: every dataset) against their recorded CRC-32, streaming each
        once in blocks of VERIFY_BLOCK_BYTES; datasets already checked are skipped. CacheError
        naming the file, the dataset and the rebuild command on a mismatch."""
        if not self._check_sums:
            return
        for name in self.names if names is None else names:
            if name in self._verified:
                continue
            ds = self._dataset(name)
            row_bytes = max(1, int(math.prod(ds.shape[1:])) * ds.dtype.itemsize)
            step = max(1, VERIFY_BLOCK_BYTES // row_bytes)
            buffer = np.empty((min(step, self.n), *ds.shape[1:]), dtype=ds.dtype)
            crc = 0
            for start in range(0, self.n, step):
                count = min(step, self.n - start)
                ds.read_direct(buffer, np.s_[start : start + count], np.s_[0:count])
                crc = zlib.crc32(buffer[:count], crc)
            self._compare(name, crc)

    def _compare(self, name: str, crc: int) -> None:
        want = int(self._file[name].attrs[CHECKSUM])
        if crc != want:
            raise CacheError(
                f"{self.path}: dataset '{name}' is corrupt (its bytes changed on disk since they were written: "
                f"crc32 {crc:08x}, recorded {want:08x}); {self._rebuild_hint}"
            )
        self._verified.add(name)

    def _read_whole(self, name: str) -> np.ndarray:
        """Dataset `name` read into memory, checked against its CRC-32 on the way (no extra read)."""
        ds = self._dataset(name)
        array = np.empty(ds.shape, dtype=ds.dtype)
        if array.size:
            ds.read_direct(array)
        if self._check_sums and name not in self._verified:
            self._compare(name, zlib.crc32(array))
        return array

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ram.clear()
        if self._file.id.valid:
            self._file.close()

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self.names:
            raise CacheError(
                f"{self.path} has no dataset '{name}' (has: {', '.join(self.names)}); {self._rebuild_hint}"
            )
        return self._file[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-row shape of dataset `name` (without the leading n)."""
        return tuple(self._dataset(name).shape[1:])

    def nbytes(self, name: str) -> int:
        """Stored size of dataset `name` in bytes (what `load` puts in RAM)."""
        ds = self._dataset(name)
        return int(math.prod(ds.shape)) * ds.dtype.itemsize

    def check(self, expected: dict, rebuild_hint: str) -> None:
        """Raise CacheError on the first key of `expected` whose cached meta value differs."""
        for key, want in expected.items():
            have = self.meta.get(key, _MISSING)
            if have is _MISSING or have != _json_normal(want):
                raise CacheError(
                    f"{self.path}: cache field '{key}' differs (cached {_short(have)}, expected {_short(want)}); "
                    f"{rebuild_hint}"
                )

    def rows_of(self, positions: torch.Tensor) -> torch.Tensor:
        """File rows holding training-split `positions` (same order).

        CacheError when the file holds no row for one of them (a cache of another training
        subset: extend it, see common/profile.py); IndexError for a whole-split cache asked
        for a position past its end.
        """
        index = positions.detach().cpu().reshape(-1).long().contiguous()
        if self.positions is None:
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
                raise IndexError(f"gather indices must lie in [0, {self.n}) for {self.path}")
            return index
        if not self.positions.numel():
            rows = torch.zeros_like(index)
            absent = torch.ones_like(index, dtype=torch.bool)
        else:
            where = torch.searchsorted(self._sorted_positions, index).clamp_(max=len(self.positions) - 1)
            absent = self._sorted_positions[where] != index
            rows = self._row_of_sorted[where]
        if bool(absent.any()):
            raise CacheError(
                f"{self.path} holds no row for training position {int(index[absent][0])} "
                f"({int(absent.sum())} of {index.numel()} asked for are missing; it caches {len(self.positions)} rows); "
                f"{self._rebuild_hint}"
            )
        return rows

    def covers(self, positions: torch.Tensor) -> bool:
        """True when every training-split position in `positions` has a row in this file."""
        try:
            self.rows_of(positions)
        except (CacheError, IndexError):
            return False
        return True

    def load(self, names: Sequence[str], max_bytes: int, rows: torch.Tensor | None = None) -> bool:
        """Read `names` into RAM if their stored size totals <= max_bytes; all or nothing.

        rows: only these training-split positions (e.g. a student's training subset), so a run
        on 2 000 images does not hold the features of all 60 000. Kept in the stored dtype
        (float16 halves the RAM); `gather` converts per batch and then accepts only loaded rows.
        """
        if rows is not None:
            rows = torch.unique(self.rows_of(rows))
            if int(rows.numel()) == self.n:  # every row (the usual case): a whole, checksummed read
                rows = None
        n_rows = self.n if rows is None else int(rows.numel())
        if sum(self.nbytes(name) // max(1, self.n) * n_rows for name in names) > max_bytes:
            return False
        for name in names:
            if name in self._ram:
                continue
            if rows is None:
                array = self._read_whole(name)
            else:
                self.verify([name])  # a partial read cannot be checked by itself: one streaming pass first
                array = self._read_rows(self._dataset(name), rows.numpy())
            self._ram[name] = torch.from_numpy(np.ascontiguousarray(array))
        if rows is not None:
            self._ram_position = torch.full((self.n,), -1, dtype=torch.long)
            self._ram_position[rows] = torch.arange(len(rows))
        return True

    def is_loaded(self, name: str) -> bool:
        return name in self._ram

    def gather(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows of training-split positions `indices` (any order, duplicates allowed) of `name`.

        Floating datasets come back as float32, others (labels) in their stored dtype. From RAM
        if loaded; from disk otherwise: h5py needs increasing unique indices, so sort + dedupe,
        read (one slice when the rows nearly fill their span), and undo the sort.
        """
        index = self.rows_of(indices)
        if name in self._ram:
            if self._ram_position is not None:
                index = self._ram_position[index]
                if index.numel() and int(index.min()) < 0:
                    raise IndexError(f"gather asked {self.path} for rows that were not loaded into RAM")
            rows = self._ram[name].index_select(0, index)
        else:
            rows = torch.from_numpy(self._read_rows(self._dataset(name), index.numpy()))
        return rows.float() if rows.is_floating_point() else rows

    @staticmethod
    def _read_rows(ds: h5py.Dataset, index: np.ndarray) -> np.ndarray:
        if index.size == 0:
            return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
        unique, inverse = np.unique(index, return_inverse=True)
        low, high = int(unique[0]), int(unique[-1]) + 1
        if unique.size >= SLICE_FILL * (high - low):
            rows = ds[low:high]
            if unique.size != high - low:
                rows = rows[unique - low]
        else:
            rows = ds[unique]
        if unique.size == index.size and np.array_equal(unique, index):
            return rows
        return rows[inverse.reshape(-1)]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def storage_order(positions: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The order stage 1 stores cache rows in: a seeded random permutation of `positions`.

    Disk-block batches (`epoch_batches` with a block size) then mix classes whatever order the
    dataset itself is stored in; a class-sorted split would otherwise give batches of 1-2 classes.
    """
    return positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))]


def epoch_batches(
    indices: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    block_size: int | None = None,
    file_rows: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """One epoch's mini-batches of `indices` (positions in the cached split), drop_last (METHOD 2.4).

    block_size None: a random permutation cut into batches. Otherwise the indices, in the order
    of their rows in the file (`file_rows`, the row of each index; default: the indices
    themselves), are cut into contiguous blocks of block_size (the remainder joins the last
    block, so every block holds >= batch_size indices and a batch spans at most two blocks), the
    block order and the order inside each block are shuffled, and the stream is cut into
    batches: each batch reads from one or two contiguous regions of the file. Deterministic
    given `generator`.
    """
    indices = indices.reshape(-1).long()
    if len(indices) < batch_size:
        raise ConfigError(
            f"only {len(indices)} training samples for batch size {batch_size}; lower train.batch_size"
        )
    if block_size is None:
        order = indices[torch.randperm(len(indices), generator=generator)]
    else:
        if block_size < batch_size:
            raise ConfigError(f"cache block size {block_size} is below batch size {batch_size}; raise the block size")
        key = indices if file_rows is None else file_rows.reshape(-1).long()
        ordered = indices[torch.argsort(key, stable=True)]
        bounds = list(range(0, len(ordered) - block_size + 1, block_size))[1:] + [len(ordered)]
        starts = [0] + bounds[:-1]
        blocks = [ordered[s:e] for s, e in zip(starts, bounds)]
        shuffled = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        order = torch.cat([b[torch.randperm(len(b), generator=generator)] for b in shuffled])
    count = len(order) // batch_size
    return list(order[: count * batch_size].split(batch_size))
