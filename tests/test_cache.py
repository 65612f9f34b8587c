"""HDF5 feature cache: round trip, gathers, validation, atomic writes, epoch batching."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.cache.reader import FeatureCache, epoch_batches, storage_order
from common.cache.write import write_h5
from common.errors import CacheError, ConfigError
from tests.stages import temp_files

N = 50
SHAPES = {"layer_3": (4, 2, 2), "logits": (10,), "labels": ()}
DTYPES = {"layer_3": "float16", "logits": "float32", "labels": "int64"}
META = {"teacher_sha256": "ab" * 32, "split": "train", "layers": [3, 7], "dtype": "float16"}


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer_3": rng.standard_normal((N, 4, 2, 2)).astype(np.float32) * 100,
        "logits": rng.standard_normal((N, 10)).astype(np.float32),
        "labels": rng.integers(0, 10, N),
    }


def batches_of(data: dict[str, np.ndarray], size: int = 16, as_torch: bool = True):
    for start in range(0, N, size):
        yield {k: (torch.from_numpy(v[start : start + size]) if as_torch else v[start : start + size]) for k, v in data.items()}


def write(path: Path, data: dict[str, np.ndarray], **kwargs) -> None:
    write_h5(path, META, N, SHAPES, DTYPES, batches_of(data), **kwargs)


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_round_trip(tmp_path: Path, chunk_rows: int | None) -> None:
    data, path = make_data(), tmp_path / "features.h5"
    write(path, data, chunk_rows=chunk_rows)
    with FeatureCache(path) as cache:
        assert cache.n == N and cache.meta == META
        assert cache.names == sorted(SHAPES)
        assert cache.shape("layer_3") == (4, 2, 2) and cache.shape("labels") == ()
        every = torch.arange(N)
        layer = cache.gather("layer_3", every)
        assert layer.dtype == torch.float32
        np.testing.assert_array_equal(layer.numpy(), data["layer_3"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(cache.gather("logits", every).numpy(), data["logits"])
        labels = cache.gather("labels", every)
        assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(data["labels"]))
    with h5py.File(path, "r") as raw:
        assert raw["layer_3"].dtype == np.float16 and raw["logits"].dtype == np.float32


def test_numpy_batches_accepted(tmp_path: Path) -> None:
    data, path = make_data(), tmp_path / "f.h5"
    write_h5(path, META, N, SHAPES, DTYPES, batches_of(data, size=7, as_torch=False))
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.gather("logits", torch.arange(N)).numpy(), data["logits"])


@pytest.mark.parametrize(
    "indices",
    [
        [7, 3, 3, 49, 0, 7, 12],  # unsorted, duplicates, wide span: point selection
        [20, 22, 21, 21, 23, 24, 25],  # dense span: one slice
        [9],
        [],
    ],
)
def test_gather_order_ram_and_disk_equal(tmp_path: Path, indices: list[int]) -> None:
    data, path = make_data(), tmp_path / "f.h5"
    write(path, data)
    index = torch.tensor(indices, dtype=torch.long)
    with FeatureCache(path) as cache:
        from_disk = {name: cache.gather(name, index) for name in SHAPES}
        assert cache.load(list(SHAPES), max_bytes=10**9)
        assert cache.is_loaded("layer_3")
        from_ram = {name: cache.gather(name, index) for name in SHAPES}
    for name in SHAPES:
        expected = torch.from_numpy(data[name][indices])
        if expected.is_floating_point():
            expected = expected.to(getattr(torch, DTYPES[name])).float()
        assert from_disk[name].shape == (len(indices), *SHAPES[name])
        assert torch.equal(from_disk[name], expected), name
        assert torch.equal(from_ram[name], expected), name


def test_gather_rejects_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write(path, make_data())
    with FeatureCache(path) as cache, pytest.raises(IndexError):
        cache.gather("logits", torch.tensor([0, N]))


def test_load_respects_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write(path, make_data())
    layer_bytes = N * 16 * 2  # float16 rows of 4*2*2
    logits_bytes = N * 10 * 4
    with FeatureCache(path) as cache:
        assert cache.nbytes("layer_3") == layer_bytes
        assert not cache.load(["layer_3", "logits"], max_bytes=layer_bytes + logits_bytes - 1)
        assert not cache.is_loaded("layer_3") and not cache.is_loaded("logits")  # all or nothing
        assert cache.load(["layer_3", "logits"], max_bytes=layer_bytes + logits_bytes)
        assert cache.is_loaded("layer_3") and cache.is_loaded("logits") and not cache.is_loaded("labels")


def test_check_names_first_differing_field(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write(path, make_data())
    with FeatureCache(path) as cache:
        cache.check({"split": "train", "layers": (3, 7)}, "rebuild it")  # tuple == stored list
        with pytest.raises(CacheError) as err:
            cache.check({"split": "train", "layers": [3, 8], "teacher_sha256": "cd" * 32}, "run make profile")
        message = str(err.value)
        assert "'layers'" in message and "[3, 7]" in message and "[3, 8]" in message
        assert "teacher_sha256" not in message and "run make profile" in message and str(path) in message
        assert "\n" not in message
        with pytest.raises(CacheError, match="'dataset'.*<missing>"):
            cache.check({"dataset": "fashion_mnist"}, "rebuild")
        with pytest.raises(CacheError) as err:
            cache.check({"teacher_sha256": "cd" * 32}, "rebuild")
        assert "cd" * 32 not in str(err.value) and "cdcdcdcd" in str(err.value)  # long values shortened


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.h5"
    with pytest.raises(CacheError, match=str(path)):
        FeatureCache(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write(path, make_data())
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CacheError, match=f"{path} is incomplete or corrupt.*delete it"):
        FeatureCache(path)


def test_file_without_complete_flag(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write(path, make_data())
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(CacheError, match=f"{path} is incomplete or corrupt.*rerun stage 1"):
        FeatureCache(path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    path.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(CacheError, match=f"{path} is incomplete or corrupt"):
        FeatureCache(path, rebuild_hint="rerun make profile")


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    old = make_data(0)
    write(path, old)
    before = path.read_bytes()

    def failing():
        for i, batch in enumerate(batches_of(make_data(1))):
            if i == 2:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        write_h5(path, META, N, SHAPES, DTYPES, failing())
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.gather("logits", torch.arange(N)).numpy(), old["logits"])


def test_short_batches_raise(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    short = (b for i, b in enumerate(batches_of(make_data())) if i < 2)
    with pytest.raises(ValueError, match="expected n=50"):
        write_h5(path, META, N, SHAPES, DTYPES, short)
    assert not path.exists() and temp_files(tmp_path) == []


def test_stale_temp_of_dead_writer_removed(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "f.h5"
    dead_pid = 2**22 + 12345  # above the default pid_max: no live process
    stale = tmp_path / f".f.h5.{socket.gethostname()}.{dead_pid}.tmp"
    live = tmp_path / f".f.h5.{socket.gethostname()}.{os.getppid()}.tmp"  # a live process's write
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    write(path, make_data())
    assert not stale.exists() and live.exists()


def test_copy_from_keeps_old_datasets(tmp_path: Path) -> None:
    data, path = make_data(), tmp_path / "f.h5"
    write(path, data)
    extra = np.arange(N * 3, dtype=np.float32).reshape(N, 3)
    new_logits = data["logits"] + 1
    rows = ({"layer_9": extra[s : s + 20], "logits": new_logits[s : s + 20]} for s in range(0, N, 20))
    meta = {**META, "layers": [3, 7, 9]}
    write_h5(path, meta, N, {"layer_9": (3,), "logits": (10,)}, {"layer_9": "float32", "logits": "float32"}, rows, copy_from=path)
    with FeatureCache(path) as cache:
        assert cache.names == sorted(["layer_3", "layer_9", "logits", "labels"])
        assert cache.meta["layers"] == [3, 7, 9]
        every = torch.arange(N)
        np.testing.assert_array_equal(cache.gather("layer_9", every).numpy(), extra)
        np.testing.assert_array_equal(cache.gather("logits", every).numpy(), new_logits)  # rewritten, not copied
        np.testing.assert_array_equal(
            cache.gather("layer_3", every).numpy(), data["layer_3"].astype(np.float16).astype(np.float32)
        )
        assert torch.equal(cache.gather("labels", every), torch.from_numpy(data["labels"]))


def test_copy_from_with_other_n_raises(tmp_path: Path) -> None:
    src, path = tmp_path / "src.h5", tmp_path / "f.h5"
    write(src, make_data())
    rows = iter([{"x": np.zeros((10, 2), np.float32)}])
    with pytest.raises(CacheError, match="holds 50 rows, not 10"):
        write_h5(path, {}, 10, {"x": (2,)}, {"x": "float32"}, rows, copy_from=src)
    assert not path.exists() and temp_files(tmp_path) == []


def test_float16_overflow_raises(tmp_path: Path) -> None:
    data, path = make_data(), tmp_path / "f.h5"
    data["layer_3"][33, 1, 0, 1] = 70000.0
    with pytest.raises(CacheError, match="'layer_3'.*row 33.*profile.cache_dtype=float32"):
        write(path, data)
    assert not path.exists() and temp_files(tmp_path) == []
    write_h5(path, META, N, SHAPES, {**DTYPES, "layer_3": "float32"}, batches_of(data))  # the suggested fix works
    with FeatureCache(path) as cache:
        assert cache.gather("layer_3", torch.tensor([33]))[0, 1, 0, 1] == 70000.0


def test_epoch_batches_random() -> None:
    indices = torch.arange(100, 1100, 3)  # 334 indices
    batches = epoch_batches(indices, 32, torch.Generator().manual_seed(1))
    assert len(batches) == 334 // 32 and all(len(b) == 32 for b in batches)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == len(seen) and set(seen.tolist()) <= set(indices.tolist())
    again = epoch_batches(indices, 32, torch.Generator().manual_seed(1))
    other = epoch_batches(indices, 32, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat(batches), torch.cat(other))
    assert not torch.equal(seen, seen.sort().values)  # shuffled


@pytest.mark.parametrize("block_size", [32, 50, 100])
def test_epoch_batches_blocks(block_size: int) -> None:
    rng = np.random.default_rng(0)
    indices = torch.from_numpy(rng.choice(5000, 437, replace=False))
    batch_size = 32
    batches = epoch_batches(indices, batch_size, torch.Generator().manual_seed(3), block_size=block_size)
    assert len(batches) == 437 // batch_size and all(len(b) == batch_size for b in batches)
    seen = torch.cat(batches).tolist()
    assert len(set(seen)) == len(seen) and set(seen) <= set(indices.tolist())
    # block of an index: its rank in sorted order // block_size, the remainder joining the last block
    rank = {int(v): r for r, v in enumerate(indices.sort().values)}
    last = 437 // block_size - 1
    for batch in batches:
        blocks = {min(rank[int(v)] // block_size, last) for v in batch}
        assert len(blocks) <= 2
    again = epoch_batches(indices, batch_size, torch.Generator().manual_seed(3), block_size=block_size)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = epoch_batches(indices, batch_size, torch.Generator().manual_seed(4), block_size=block_size)
    assert not torch.equal(torch.cat(batches), torch.cat(other))


def test_epoch_batches_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="batch size"):
        epoch_batches(torch.arange(10), 32, torch.Generator())
    with pytest.raises(ConfigError, match="block size"):
        epoch_batches(torch.arange(100), 32, torch.Generator(), block_size=16)


def test_load_only_some_rows(tmp_path):
    """A student trained on a subset holds only its rows in RAM; others are refused."""
    data = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    path = tmp_path / "c.h5"
    write_h5(path, {"k": 1}, 50, {"x": (3,)}, {"x": "float32"}, [{"x": data[:20]}, {"x": data[20:]}])
    rows = torch.tensor([40, 3, 7, 3])
    with FeatureCache(path) as cache:
        assert not cache.load(["x"], max_bytes=3 * 4 * 2, rows=rows)  # 3 unique rows do not fit in 2
        assert cache.load(["x"], max_bytes=3 * 4 * 3, rows=rows)
        assert torch.equal(cache.gather("x", torch.tensor([7, 40, 3, 7])), data[[7, 40, 3, 7]])
        with pytest.raises(IndexError, match="not loaded"):
            cache.gather("x", torch.tensor([5]))


def _write_with_positions(path: Path, positions: np.ndarray) -> dict[str, np.ndarray]:
    data = {**make_data(), "positions": positions.astype(np.int64)}
    write_h5(path, META, N, {**SHAPES, "positions": ()}, {**DTYPES, "positions": "int64"}, batches_of(data))
    return data


@pytest.mark.parametrize("in_ram", [False, True])
def test_a_cache_of_some_rows_is_addressed_by_training_position(tmp_path: Path, in_ram: bool) -> None:
    positions = np.sort(np.random.default_rng(1).choice(1000, N, replace=False))
    data, path = _write_with_positions(tmp_path / "f.h5", positions), tmp_path / "f.h5"
    with FeatureCache(path) as cache:
        assert torch.equal(cache.positions, torch.from_numpy(positions))
        if in_ram:  # only some of the rows, by position
            assert cache.load(["logits"], 1 << 30, rows=torch.from_numpy(positions[::2]))
        asked = torch.from_numpy(positions[[8, 2, 2, 40]])
        np.testing.assert_array_equal(cache.gather("logits", asked).numpy(), data["logits"][[8, 2, 2, 40]])
        absent = int(np.setdiff1d(np.arange(1000), positions)[0])
        assert cache.covers(torch.from_numpy(positions)) and not cache.covers(torch.tensor([absent]))
        with pytest.raises(CacheError, match=f"no row for training position {absent}"):
            cache.gather("labels", torch.tensor([int(positions[0]), absent]))


def test_disk_batches_mix_classes_even_when_the_split_is_stored_class_by_class(tmp_path: Path, monkeypatch) -> None:
    """Tiny ImageNet stores its training images class by class: position // 200 is the class here.
    Rows stored in `storage_order` make disk-block batches as mixed as random ones."""
    from common.train.teacher_source import CachedTeacher

    n, classes, batch = 2000, 10, 32
    positions = storage_order(torch.arange(n))
    labels = positions // (n // classes)
    path = tmp_path / "c.h5"
    write_h5(path, {}, n, {"positions": (), "layer_0": ()}, {"positions": "int64", "layer_0": "float32"},
             [{"positions": positions, "layer_0": labels.float()}])
    monkeypatch.setattr(CachedTeacher, "block_order_bytes", 0)  # as for a cache too large for random reads
    monkeypatch.setattr(CachedTeacher, "block_size", 128)
    with FeatureCache(path) as cache:
        source = CachedTeacher(cache, [0], False, torch.device("cpu"), max_ram_bytes=0)
        assert source.from_disk and source.block_order
        batches = source.batch_order(torch.arange(n), batch, torch.Generator().manual_seed(0))
        mixed = sum(len(set((b // (n // classes)).tolist())) for b in batches) / len(batches)
        feats, _ = source.batch(batches[0], torch.empty(0))
        assert torch.equal(feats[0], (batches[0] // (n // classes)).float())  # the rows asked for
        rows = cache.rows_of(torch.cat(batches))
        last = n // 128 - 1  # the remainder joins the last block
        blocks = [len(set((r // 128).clamp(max=last).tolist())) for r in rows.split(batch)]
    # the old layout (rows sorted by position) read blocks of 128 consecutive positions: <= 2 classes
    sorted_order = epoch_batches(torch.arange(n), batch, torch.Generator().manual_seed(0), block_size=128)
    clumped = sum(len(set((b // (n // classes)).tolist())) for b in sorted_order) / len(sorted_order)
    assert clumped <= 2.0 and mixed >= 8.0  # 32 draws of 10 classes give ~9.7 distinct on average
    assert max(blocks) <= 2  # each batch still reads at most two contiguous regions of the file


def test_batch_order_does_not_depend_on_free_memory(tmp_path: Path) -> None:
    """The same seed gives the same batches whether the cache went to RAM or stays on disk."""
    from common.train.teacher_source import CachedTeacher

    data, path = make_data(), tmp_path / "f.h5"
    write(path, data)
    orders = []
    for ram in (1 << 30, 0):
        with FeatureCache(path) as cache:
            source = CachedTeacher(cache, [3], True, torch.device("cpu"), max_ram_bytes=ram)
            assert source.from_disk == (ram == 0)
            orders.append(torch.cat(source.batch_order(torch.arange(N), 8, torch.Generator().manual_seed(5))))
    assert torch.equal(orders[0], orders[1])


@pytest.mark.parametrize(
    ("overrides", "streamed", "cause"),
    [
        (["train.augment=true"], False, "train.augment=true"),
        (["train.augment=true"], True, "train.augment=true"),
        ([], True, "is streamed"),
        (["train.teacher_source=live"], False, "train.teacher_source=live"),
        ([], False, None),
        (["train.teacher_source=cache"], True, None),
    ],
)
def test_stage_1_names_the_setting_that_leaves_out_the_cache(overrides, streamed, cause):
    """Stage 1 said 'no feature cache for streamed cifar100' when train.augment=true was the cause."""
    from types import SimpleNamespace

    from common.config import load_config
    from common.profile.features import no_cache_reason, wants_cache

    cfg = load_config(None, ["train.epochs=1", *overrides])
    data = SimpleNamespace(name="cifar100", streamed=streamed)
    reason = no_cache_reason(cfg, data)
    assert (reason is None) == wants_cache(cfg, data)
    assert reason is None if cause is None else cause in reason


def test_writing_a_cache_logs_progress_lines_where_stderr_is_no_terminal(tmp_path: Path, caplog) -> None:
    """Stage 1's extraction into the cache can take hours on ImageNet; a cluster log sees lines."""
    import sys

    caplog.set_level("INFO", logger="kd")
    assert not sys.stderr.isatty()
    write(tmp_path / "features.h5", make_data(), log_interval_s=1e-9)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features.h5: row ")]
    assert lines and all(" rows/s, ETA " in line for line in lines)
    done = [line.split()[2] for line in lines]  # "16/100,"
    assert all(d.endswith(f"/{N},") for d in done)
    counts = [int(d.split("/")[0]) for d in done]
    assert counts == sorted(counts) and 0 < counts[-1] <= N
