"""Time one epoch of FeatureCache.gather (batch 128) from disk (random / block-shuffled) and from RAM.

Usage: .venv/bin/python bench/bench_cache_read.py [--rows 60000 --dim 6272 --block 4096 --chunk-rows N]
The file is freshly written, so "disk" reads mostly hit the OS page cache: the numbers measure
HDF5's per-batch overhead, a lower bound for a cold disk.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cache.reader import FeatureCache, epoch_batches  # noqa: E402
from common.cache.write import write_h5  # noqa: E402


def synthetic_rows(rows: int, dim: int, step: int = 2048):
    rng = np.random.default_rng(0)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        yield {"features": rng.standard_normal((count, dim), dtype=np.float32)}


def time_epoch(cache: FeatureCache, batches: list[torch.Tensor], repeats: int) -> float:
    """Fastest of `repeats` epochs: the machine is shared, the minimum is the least disturbed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            cache.gather("features", batch)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=6272)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=None, help="chunked layout instead of contiguous")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per variant; the fastest counts")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temp file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "features.h5"
        start = time.perf_counter()
        write_h5(path, {"bench": True}, args.rows, {"features": (args.dim,)}, {"features": "float16"},
                 synthetic_rows(args.rows, args.dim), chunk_rows=args.chunk_rows)
        size_mb = path.stat().st_size / 2**20
        print(f"wrote {args.rows} x {args.dim} float16 ({size_mb:.0f} MB, "
              f"{'chunks of %d rows' % args.chunk_rows if args.chunk_rows else 'contiguous'}) "
              f"in {time.perf_counter() - start:.1f} s")
        indices = torch.arange(args.rows)
        with FeatureCache(path) as cache:
            generator = torch.Generator().manual_seed(0)
            random_s = time_epoch(cache, epoch_batches(indices, args.batch, generator), args.repeats)
            block_s = time_epoch(cache, epoch_batches(indices, args.batch, generator, block_size=args.block),
                                 args.repeats)
            start = time.perf_counter()
            assert cache.load(["features"], max_bytes=2**40)
            load_s = time.perf_counter() - start
            ram_s = time_epoch(cache, epoch_batches(indices, args.batch, generator), args.repeats)
    steps = args.rows // args.batch
    print(f"one epoch, {steps} batches of {args.batch} (fastest of {args.repeats}):")
    print(f"  (a) disk, random permutation : {random_s:7.2f} s")
    print(f"  (b) disk, block-shuffled {args.block:<5}: {block_s:7.2f} s   (a)/(b) = {random_s / block_s:.1f}x")
    print(f"  (c) RAM  (load took {load_s:.2f} s)   : {ram_s:7.2f} s   (a)/(c) = {random_s / ram_s:.1f}x, "
          f"(b)/(c) = {block_s / ram_s:.1f}x")


if __name__ == "__main__":
    main()
