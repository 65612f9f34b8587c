"""Time `common.quality.layer_stats` at stage-1 scale: |A| = 5000 (10 classes x 500), B = A.

    .venv/bin/python bench/bench_quality.py [--dims 512 8192 32768] [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quality import layer_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 8192, 32768])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(args.samples) % args.classes
    for dim in args.dims:
        # ReLU features around class means, float32 like extracted activations
        means = torch.randn(args.classes, dim, generator=generator)
        features = (means[labels] + torch.randn(args.samples, dim, generator=generator)).relu_()
        if args.device is not None and args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = layer_stats(features, labels, features, labels, 60000, device=args.device)
        if args.device is not None and args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"|A|={args.samples} D={dim:6d}: {seconds:7.2f} s   Q={stats['Q']:.6f}", flush=True)


if __name__ == "__main__":
    main()
