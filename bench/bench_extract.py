#!/usr/bin/env python3
"""Stage 1's feature extraction with HDF5 writes on, against the teacher's pure inference.

Goal (issue 9): images/s of the real extraction path (common/profile/features.py
`ensure_features_with`: forward, copy to the CPU, cast to the cache dtype, CRC-32, HDF5 write,
fsync, rename) >= 0.85 x images/s of the same forward with the same layers hooked and nothing
written: same teacher, same batches (profile.batch_size, the cache's row order), same device,
same process. The extraction runs twice, with the writer thread
(common.cache.write.WRITE_QUEUE_DEPTH) and with each batch written before the next is computed
(depth 0); the three variants are interleaved over repeats (order alternating) so that a busy
shared machine slows all alike, and each one's CPU seconds are shown beside its wall time.

The data are CIFAR-100-shaped pickles written to a temporary directory by the generator of
bench/bench_profile_scale.py (the real on-disk format and loader). The teacher is the registry's
resnet34 with a seeded random init: the cost does not depend on its accuracy. The layers are
its baseline layers (3, 7, 13, 16: 240 KiB per row in float16 at full width).

A second table writes real features of that teacher (float16) in each storage layout: chunk
rows x compression, with the HDF5 write, flush and fsync timed, the file size, and the time to
read one random row (stage 2's disk path gathers random rows; bench/bench_cache_read.py has the
whole-epoch figure).

  .venv/bin/python bench/bench_extract.py --images 2000 --repeats 3          # full width
  .venv/bin/python bench/bench_extract.py --images 512 --width 0.25 --repeats 2 --layout-images 512
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_profile_scale import write_cifar100  # noqa: E402
from common.cache import write as cache_write  # noqa: E402
from common.cache.reader import layer_name, storage_order  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from common.data.registry import Data, load_data  # noqa: E402
from common.layers.tables import layer_shapes  # noqa: E402
from common.layers.hooks import forward_with_features  # noqa: E402
from common.models import MODELS  # noqa: E402
from common.profile.features import ensure_features_with, features_path  # noqa: E402
from common.profile.teacher import build_teacher  # noqa: E402
from common.runtime import resolve_device  # noqa: E402

GOAL = 0.85
INFERENCE = "inference, no writes"
MIB = 2**20
CHUNK_ROWS = (None, 1, 16, 64, 256)  # None: contiguous (what write_h5 stores by default)
COMPRESSIONS = {"none": {}, "lzf": {"compression": "lzf"}, "gzip-1": {"compression": "gzip", "compression_opts": 1}}
READ_ROWS = 16  # random rows read per layout for the read column


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="training images extracted per pass")
    p.add_argument("--width", type=float, default=1.0, help="teacher width (1.0: the paper's shape)")
    p.add_argument("--teacher", default="resnet34")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="teacher layers (default: the model's baseline layers)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes of each variant; medians are reported")
    p.add_argument("--layout-images", type=int, default=1024, help="rows written per storage layout (0: skip that table)")
    p.add_argument("--tmp-dir", default=None, help="where the data and caches go (a real disk, not a tmpfs, for honest writes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. profile.batch_size=128 profile.device=cuda")
    args = p.parse_args()
    if args.images < 100:
        p.error("--images must be at least 100 (one image per CIFAR-100 class)")
    return args


def bench_config(args: argparse.Namespace, tmp: Path) -> Config:
    return load_config(None, [
        "dataset.name=cifar100", f"dataset.root={tmp / 'data'}", f"artifacts={tmp / 'artifacts'}",
        f"teacher.name={args.teacher}", f"teacher.width={args.width}", "profile.progress=false", *args.overrides,
    ])


def seeded_teacher(cfg: Config, data: Data, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = build_teacher(cfg, data).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def inference(teacher: torch.nn.Module, data: Data, positions: torch.Tensor, layers: list[int], batch_size: int, device: torch.device) -> None:
    """The teacher's forward over the cache's batches with `layers` hooked, nothing kept."""
    for start in range(0, len(positions), batch_size):
        x = data.normalize(data.train.images[positions[start : start + batch_size]], device)
        forward_with_features(teacher, x, layers)
    synchronize(device)


def extraction(cfg: Config, data: Data, teacher: torch.nn.Module, layers: list[int], device: torch.device, queue_depth: int) -> Path:
    """Stage 1's own extraction path, from no cache to a finished features-<dtype>.h5, with
    `queue_depth` batches in the writer thread's hands (0: each written before the next is computed)."""
    path = features_path(cfg, data)
    path.unlink(missing_ok=True)
    default, cache_write.WRITE_QUEUE_DEPTH = cache_write.WRITE_QUEUE_DEPTH, queue_depth
    try:
        return ensure_features_with(cfg, data, teacher, "bench", layers, data.train_indices, device)
    finally:
        cache_write.WRITE_QUEUE_DEPTH = default


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (all threads of this process) of each variant per repeat; the order
    alternates so drift hits all alike. CPU seconds barely move with other processes' load."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            tic, cpu_tic = time.perf_counter(), time.process_time()
            variants[name]()
            wall[name].append(time.perf_counter() - tic)
            cpu[name].append(time.process_time() - cpu_tic)
            print(f"  repeat {rep + 1}: {name} {wall[name][-1]:.2f} s ({cpu[name][-1]:.2f} CPU s)", file=sys.stderr, flush=True)
    return wall, cpu


# ----------------------------------------------------------------------------- storage layouts


@dataclass(frozen=True)
class Layout:
    chunk_rows: int | None
    compression: str

    @property
    def label(self) -> str:
        return f"{'contiguous' if self.chunk_rows is None else f'{self.chunk_rows} rows'}, {self.compression}"


def layouts() -> list[Layout]:
    """Every chunking with every compression; HDF5 compresses only chunked datasets."""
    return [Layout(rows, c) for rows in CHUNK_ROWS for c in COMPRESSIONS if rows is not None or c == "none"]


@torch.no_grad()
def float16_rows(teacher: torch.nn.Module, data: Data, layers: list[int], n: int, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """`n` rows of real teacher features in the cache dtype (activations compress as they are)."""
    positions = data.train_indices[: min(n, batch_size)]
    _, feats = forward_with_features(teacher, data.normalize(data.train.images[positions], device), layers)
    reps = -(-n // len(positions))  # one batch tiled: the forward is not what this table measures
    return {layer_name(i): np.tile(f.half().cpu().numpy(), (reps,) + (1,) * (f.dim() - 1))[:n] for i, f in feats.items()}


def write_layout(path: Path, arrays: dict[str, np.ndarray], layout: Layout, batch_size: int) -> float:
    """Seconds to write `arrays` batch by batch in `layout`, flushed and fsynced."""
    n = len(next(iter(arrays.values())))
    tic = time.perf_counter()
    with h5py.File(path, "w") as out:
        datasets = {
            name: out.create_dataset(name, a.shape, dtype=a.dtype, **COMPRESSIONS[layout.compression],
                                     chunks=None if layout.chunk_rows is None else (min(layout.chunk_rows, n), *a.shape[1:]))
            for name, a in arrays.items()
        }
        for start in range(0, n, batch_size):
            for name, a in arrays.items():
                datasets[name][start : start + batch_size] = a[start : start + batch_size]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - tic


def read_random_rows(path: Path, names: list[str], rows: np.ndarray) -> float:
    """Seconds per row to read `rows` one point selection at a time, every dataset (cold HDF5 chunk cache)."""
    with h5py.File(path, "r") as f:
        tic = time.perf_counter()
        for name in names:
            f[name][np.sort(rows)]
        return (time.perf_counter() - tic) / len(rows)


def layout_table(arrays: dict[str, np.ndarray], tmp: Path, batch_size: int, repeats: int) -> list[tuple[Layout, float, int, float]]:
    """(layout, median write s, file bytes, read s per row) for every layout, repeats interleaved."""
    n = len(next(iter(arrays.values())))
    rows = np.random.default_rng(0).choice(n, size=min(READ_ROWS, n), replace=False)
    writes: dict[Layout, list[float]] = {layout: [] for layout in layouts()}
    sizes, reads = {}, {}
    for _ in range(repeats):
        for layout in writes:
            path = tmp / "layout.h5"
            writes[layout].append(write_layout(path, arrays, layout, batch_size))
            sizes[layout] = path.stat().st_size
            reads[layout] = read_random_rows(path, list(arrays), rows)
            path.unlink()
    return [(layout, statistics.median(t), sizes[layout], reads[layout]) for layout, t in writes.items()]


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.tmp_dir))
    try:
        write_cifar100(tmp / "data", args.images, 100, 100)
        cfg = bench_config(args, tmp)
        data = load_data(cfg.dataset)
        device = resolve_device(cfg.profile.device)
        teacher = seeded_teacher(cfg, data, device)
        layers = list(args.layers or MODELS.get(cfg.teacher.name).baseline_layers)
        batch = cfg.profile.batch_size
        positions = storage_order(torch.unique(data.train_indices))  # the batches ensure_features_with writes
        layer_shapes(cfg, data)  # its one-off model build is cached, not timed
        inference(teacher, data, positions[:batch], layers, batch, device)  # warm-up
        depth = cache_write.WRITE_QUEUE_DEPTH
        times, cpu = interleaved({
            INFERENCE: lambda: inference(teacher, data, positions, layers, batch, device),
            f"extraction, writer thread (queue {depth})": lambda: extraction(cfg, data, teacher, layers, device, depth),
            "extraction, inline writes (queue 0)": lambda: extraction(cfg, data, teacher, layers, device, 0),
        }, args.repeats)
        size = features_path(cfg, data).stat().st_size  # every pass writes the same file
        report(args, cfg, data, device, layers, times, cpu, size)
        if args.layout_images:
            arrays = float16_rows(teacher, data, layers, args.layout_images, batch, device)
            print_layouts(layout_table(arrays, tmp, batch, args.repeats), args.layout_images, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(
    args: argparse.Namespace, cfg: Config, data: Data, device: torch.device, layers: list[int],
    times: dict[str, list[float]], cpu: dict[str, list[float]], size: int,
) -> None:
    """Per variant: median seconds, images/s, and its ratio to inference (of the medians, and the
    median of the per-repeat ratios, which a slow drift of the machine's load cancels out of)."""
    n = len(data.train_indices)
    shapes = layer_shapes(cfg, data)
    row_kib = sum(int(np.prod(shapes[i])) for i in layers) * np.dtype(cfg.profile.cache_dtype).itemsize / 1024
    print(f"\n{cfg.teacher.name} width {args.width}, layers {layers} ({row_kib:.0f} KiB/row as {cfg.profile.cache_dtype}), "
          f"{n} images, batch {cfg.profile.batch_size}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:")
    print("| variant | s (median) | all runs s | images/s | ratio to inference | per-repeat ratio (median) | CPU s (median) |")
    print("|---|---|---|---|---|---|---|")
    infer = times[INFERENCE]
    for name, values in times.items():
        med = statistics.median(values)
        paired = statistics.median(a / b for a, b in zip(infer, values))
        print(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {n / med:.1f} | "
              f"{statistics.median(infer) / med:.3f} | {paired:.3f} | {statistics.median(cpu[name]):.2f} |")
    extract = statistics.median(next(iter(v for k, v in times.items() if k != INFERENCE)))
    print(f"goal: extraction images/s >= {GOAL} x inference; file {size / MIB:.0f} MiB, {size / MIB / extract:.1f} MiB/s "
          f"written by the writer thread")


def print_layouts(table: list[tuple[Layout, float, int, float]], n: int, repeats: int) -> None:
    base = next(size for layout, _, size, _ in table if layout == Layout(None, "none"))
    print(f"\nstorage layouts: {n} rows of real float16 features, HDF5 write + flush + fsync, median of {repeats}; "
          f"read: {READ_ROWS} random rows, one point selection per dataset:")
    print("| layout | write s | write MiB/s | file MiB | size vs contiguous | random-row read ms |")
    print("|---|---|---|---|---|---|")
    for layout, seconds, size, read in table:
        print(f"| {layout.label} | {seconds:.2f} | {base / MIB / seconds:.0f} | {size / MIB:.0f} | {size / base:.2f} | {1000 * read:.2f} |")


if __name__ == "__main__":
    main()
