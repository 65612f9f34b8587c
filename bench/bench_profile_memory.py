#!/usr/bin/env python3
"""Peak memory of stage 1 at two training-set sizes (it must not grow with the size).

Writes Fashion-MNIST subsets of the given sizes (real images, IDX format) to a temporary
directory, then for each size runs, as separate processes, teacher training and the profile
(Q-subset extraction, S/I/E/Q, features.h5 for the whole training split), and reports each
process's peak RSS from the kernel (wait4) and its wall time.

  python bench/bench_profile_memory.py --sizes 15000 60000
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import read_idx  # noqa: E402
from tests.fakedata import idx_bytes  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_subset(dst: Path, n: int) -> None:
    dst.mkdir(parents=True)
    for stem, ndim, limit in [("train-images-idx3-ubyte", 3, n), ("train-labels-idx1-ubyte", 1, n),
                              ("t10k-images-idx3-ubyte", 3, None), ("t10k-labels-idx1-ubyte", 1, None)]:
        array = read_idx(FMNIST / f"{stem}.gz", ndim)
        (dst / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array[:limit]), compresslevel=1))


def measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one child process."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[15000, 60000])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", default=["teacher_train.epochs=1", "teacher_train.train_subset=2000"])
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"fmnist{n}"
            write_subset(root, n)
            base = [sys.executable, "stage1_profile_teacher.py", "--config", args.config, "--quiet",
                    f"dataset.root={root}", f"artifacts={tmp}/artifacts{n}", *args.overrides]
            teacher = measured(base + ["--train-only"])
            prof = measured(base)
            size = sum(f.stat().st_size for f in Path(f"{tmp}/artifacts{n}").rglob("features.h5"))
            rows.append((n, teacher, prof, size / 2**20))
    print("| training images | teacher: peak RSS MiB / wall s | profile (extract, Q, features.h5): peak RSS MiB / wall s | features.h5 MiB |")
    print("|---|---|---|---|")
    for n, teacher, prof, size in rows:
        print(f"| {n} | {teacher[0]:.0f} / {teacher[1]:.0f} | {prof[0]:.0f} / {prof[1]:.0f} | {size:.0f} |")


if __name__ == "__main__":
    main()
