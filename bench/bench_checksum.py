"""Cost of the feature cache's per-dataset CRC-32 on the write and read paths (warm page cache).

Usage: .venv/bin/python bench/bench_checksum.py [--rows 20000 --dim 6272 --repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common.cache.write as cache_mod  # noqa: E402
from common.cache.reader import FeatureCache, epoch_batches  # noqa: E402
from common.cache.write import write_h5  # noqa: E402


def rows(n: int, dim: int, step: int = 2048):
    rng = np.random.default_rng(0)
    for start in range(0, n, step):
        yield {"features": rng.standard_normal((min(step, n - start), dim), dtype=np.float32)}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=6272)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.h5"
        write = lambda: write_h5(path, {}, args.rows, {"features": (args.dim,)}, {"features": "float16"}, rows(args.rows, args.dim))  # noqa: E731
        w_crc = best(write, args.repeats)
        real = cache_mod.zlib
        cache_mod.zlib = SimpleNamespace(crc32=lambda data, value=0: 0)  # the writer without its checksum
        w_none = best(write, args.repeats)
        cache_mod.zlib = real
        write()
        mb = path.stat().st_size / 2**20

        def load(verify: bool) -> None:
            with FeatureCache(path, verify=verify) as c:
                assert c.load(["features"], 2**40)

        half = torch.arange(0, args.rows, 2)

        def load_half(verify: bool) -> None:
            with FeatureCache(path, verify=verify) as c:
                assert c.load(["features"], 2**40, rows=half)

        def verify_only() -> None:
            with FeatureCache(path) as c:
                c.verify(["features"])

        batches = epoch_batches(torch.arange(args.rows), 128, torch.Generator().manual_seed(0), block_size=4096)

        def disk_epoch() -> None:
            with FeatureCache(path, verify=False) as c:
                for b in batches:
                    c.gather("features", b)

        r = {k: best(f, args.repeats) for k, f in {
            "load_crc": lambda: load(True), "load_none": lambda: load(False),
            "half_crc": lambda: load_half(True), "half_none": lambda: load_half(False),
            "verify": verify_only, "disk_epoch": disk_epoch}.items()}
    crc_s = best(lambda: zlib.crc32(np.zeros(int(mb * 2**20), np.uint8)), args.repeats)
    print(f"{args.rows} x {args.dim} float16 = {mb:.0f} MiB, best of {args.repeats}, warm page cache")
    print(f"zlib.crc32 alone          : {mb / 1024 / crc_s:.2f} GiB/s ({crc_s:.3f} s)")
    print(f"write_h5     crc / none   : {w_crc:.3f} s / {w_none:.3f} s  (+{100 * (w_crc / w_none - 1):.0f} %)")
    print(f"load all     crc / none   : {r['load_crc']:.3f} s / {r['load_none']:.3f} s  (+{100 * (r['load_crc'] / r['load_none'] - 1):.0f} %)")
    print(f"load half    crc / none   : {r['half_crc']:.3f} s / {r['half_none']:.3f} s  (+{100 * (r['half_crc'] / r['half_none'] - 1):.0f} %; a streaming verify first)")
    print(f"verify (disk path, once)  : {r['verify']:.3f} s = {100 * r['verify'] / r['disk_epoch']:.0f} % of one block-shuffled disk epoch ({r['disk_epoch']:.3f} s)")


if __name__ == "__main__":
    main()
