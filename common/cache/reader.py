"""HDF5 feature cache: the file format, the validated reader, fast row gathers (METHOD 0 item 9).

Stage 1 writes the teacher's selected-layer features for the un-augmented training split (plus
logits and labels) into one HDF5 file, and the all-layer features of the Q subsets into another;
stage 2 reads mini-batch rows of it every step for many epochs. The writer is
common/cache/write.py; the format, its names and the reader live here.

File format: one flat HDF5 dataset of shape (n, *shape) per name (teacher layer i's name is
`layer_name(i)`), attributes `meta` (a JSON string: whatever keys the caller passes, checked by
`FeatureCache.check`), `n`, `format_version` and `complete` (set last, so a file without it is
never trusted). Every dataset carries a `crc32`
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
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from common.errors import CacheError, ConfigError

FORMAT_VERSION = 2  # 2: per-dataset crc32 attributes
CHECKSUM = "crc32"  # dataset attribute: zlib.crc32 of the dataset's bytes in row order
VERIFY_BLOCK_BYTES = 64 << 20  # bytes read per step of a streaming `verify` pass (bounded memory)
POSITIONS = "positions"  # dataset: training-split position of each row (rows in storage_order)
DEFAULT_REBUILD_HINT = "rerun stage 1 (stage1_profile_teacher.py)"
# A sorted gather reads one slice instead of a point selection when the rows fill at least this
# share of their span (measured: a slice wins only for nearly contiguous rows).
SLICE_FILL = 0.8


def layer_name(index: int) -> str:
    """Dataset name of teacher layer `index` in features-<dtype>.h5 / activations.h5."""
    return f"layer_{index}"


def _json_normal(value: Any) -> Any:
    """The value as it reads back from the JSON meta attribute (tuples -> lists, Paths -> str)."""
    return json.loads(json.dumps(value, default=str))


_MISSING = object()


def _short(value: Any, limit: int = 60) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FeatureCache:
    """Read-only view of a cache written by common/cache/write.py: meta, checks, RAM load, row gathers.

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

    def copy_to(self, out: h5py.File, name: str) -> None:
        """Copy dataset `name` into `out` as stored: its bytes and attributes, the checksum among
        them (so extending a cache with more layers never recomputes the old ones)."""
        self._file.copy(self._file[name], out, name=name)

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
        subset: extend it, see common/profile/features.py); IndexError for a whole-split cache asked
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
        rows = self.rows_of(indices)
        self.check_loaded(rows, [name])
        return self.gather_rows(name, rows)

    def check_loaded(self, rows: torch.Tensor, names: Sequence[str]) -> None:
        """IndexError when one of `names` is held in RAM for a subset of rows (`load(rows=...)`)
        that lacks one of file `rows` (from `rows_of`)."""
        if self._ram_position is None or not rows.numel() or not any(name in self._ram for name in names):
            return
        if int(self._ram_position[rows].min()) < 0:
            raise IndexError(f"gather asked {self.path} for rows that were not loaded into RAM")

    def gather_rows(self, name: str, rows: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """`gather` by file `rows` that `rows_of` and `check_loaded` have already accepted.

        It checks nothing, so it reads no index value on the host: a training epoch checks all
        its rows at once and gathers every batch and layer with this (CachedTeacher in
        common/train/teacher_source.py), instead of one host read per batch and layer.
        widen=False keeps the stored dtype (`widen` it later, e.g. on the device: a float16 row
        then crosses to the GPU in half the bytes and widens to the same float32).
        """
        if name in self._ram:
            index = rows if self._ram_position is None else self._ram_position[rows]
            out = self._ram[name].index_select(0, index)
        else:
            out = torch.from_numpy(self._read_rows(self._dataset(name), rows.numpy()))
        return widen_rows(out) if widen else out

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


def widen_rows(rows: torch.Tensor) -> torch.Tensor:
    """Gathered rows as readers get them: floating datasets as float32 (exact from float16),
    others (labels) in their stored dtype."""
    return rows.float() if rows.is_floating_point() else rows


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
