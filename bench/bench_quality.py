"""Time S/I/E/Q of one layer against its floor, one float32 N x D by D x N matmul (N = |A|).

|A| = |B| = 5000 (10 classes x 500) ReLU features around class means, one process, the two
timed alternately (median of --repeats). The ratio is what the metric costs over the least any
Gram-based statistic must spend; the table goes to the README.

    .venv/bin/python bench/bench_quality.py [--dims 512 4096 16384 65536] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quality.formulas import layer_stats  # noqa: E402


def _timed(fn, device: str | None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 4096, 16384, 65536])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(args.samples) % args.classes
    print(f"threads {torch.get_num_threads()}, |A| = |B| = {args.samples}, {args.classes} classes")
    print("| D | S/I/E/Q (s) | float32 X X^T floor (s) | ratio |\n|---|---|---|---|")
    for dim in args.dims:
        means = torch.randn(args.classes, dim, generator=generator)
        features = (means[labels] + torch.randn(args.samples, dim, generator=generator)).relu_()
        x = features.to(args.device) if args.device else features
        stats_s, floor_s = [], []
        for _ in range(args.repeats):
            floor_s.append(_timed(lambda: x @ x.T, args.device))
            stats_s.append(_timed(lambda: layer_stats(features, labels, features, labels, 60000, device=args.device), args.device))
        a, b = statistics.median(stats_s), statistics.median(floor_s)
        print(f"| {dim} | {a:.2f} | {b:.2f} | {a / b:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
