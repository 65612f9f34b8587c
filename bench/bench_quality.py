"""Time S/I/E/Q of one layer against its floor, one float32 N x D by D x N matmul (N = |A|).

|A| = |B| = 5000 (10 classes x 500) ReLU features around class means, one process, the two
timed alternately (median of --repeats). The ratio is what the metric costs over the least any
Gram-based statistic must spend; the table goes to the README.

    .venv/bin/python bench/bench_quality.py [--dims 512 4096 16384 65536] [--device cuda]

`--flops TEACHER` instead counts the float64 work stage 1's streaming S/I/E/Q does for that
teacher (`float64_flops`: the matrix products as common/quality/stream.py runs them, which
tests/test_quality_stream.py checks against torch's FlopCounterMode, and the eigensolves at the
textbook 4/3 m^3), at CIFAR-100's shapes by default, and the seconds that takes at the float64
rates given (`--tflops`): arithmetic, not a measurement (docs/gpus.md).

    .venv/bin/python bench/bench_quality.py --flops resnet34 --tflops 0.56 1.29 9.7 34
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.quality.formulas import _row_blocks, layer_stats  # noqa: E402


def _timed(fn, device: str | None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def float64_flops(dims: dict[int, int], n_a: int, class_sizes: list[int]) -> dict[int, dict[str, float]]:
    """Float64 flops (2 per multiply-add) of the streaming S/I/E/Q per layer of flattened width D:
    gram_a, subset A's Gram over its lower block triangle, diagonal blocks whole (accumulate_gram;
    column slices add up to the same); gram_b, each class's centred Gram of subset B on its
    smaller side (n_k^2 D, or D^2 n_k when D < n_k); eig_b, the eigenvalues of each class Gram at
    4/3 m^3 for m = min(n_k, D) (LAPACK's tridiagonal reduction; the rest is O(m^2)). Left out:
    the elementwise O(n_a^2) work of the cosines and distance bounds, and the few rows of the
    exact distance re-check."""
    blocks = [b.stop - b.start for b in _row_blocks(n_a)]
    lower = sum(blocks[i] * blocks[j] for i in range(len(blocks)) for j in range(i + 1))
    return {
        layer: {
            "gram_a": 2.0 * lower * d,
            "gram_b": sum(2.0 * n * n * d if d >= n else 2.0 * d * d * n for n in class_sizes),
            "eig_b": sum(4.0 * min(n, d) ** 3 / 3 for n in class_sizes),
        }
        for layer, d in dims.items()
    }


def print_flops(args: argparse.Namespace) -> None:
    from common.layers.hooks import layer_infos
    from common.models import create_model
    from common.quality.stream import flat_dim

    model = create_model(args.flops, num_classes=args.num_classes, in_channels=3, image_size=args.image_size).eval()
    dims = {t.index: flat_dim(t.shape) for t in layer_infos(model, (3, args.image_size, args.image_size))}
    n_a = args.num_classes * (args.subset_size // args.num_classes)
    flops = float64_flops(dims, n_a, [args.per_class] * args.num_classes)
    print(f"{args.flops}, {args.num_classes} classes at {args.image_size}px: |A| = {n_a}, B = {args.num_classes} x {args.per_class}")
    print("| layer | D | subset A Gram | subset B Grams | subset B eigenvalues |\n|---|---|---|---|---|")
    for layer, f in flops.items():
        print(f"| {layer} | {dims[layer]} | {f['gram_a']:.3g} | {f['gram_b']:.3g} | {f['eig_b']:.3g} |")
    totals = {k: sum(f[k] for f in flops.values()) for k in ("gram_a", "gram_b", "eig_b")}
    total = sum(totals.values())
    print(f"| all {len(dims)} | {sum(dims.values())} | {totals['gram_a']:.3g} | {totals['gram_b']:.3g} | {totals['eig_b']:.3g} |")
    print(f"total {total:.3g} float64 flops")
    for rate in args.tflops:
        print(f"at {rate:g} Tflop/s float64: {total / (rate * 1e12):.1f} s (arithmetic at the peak rate, not a measurement)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 4096, 16384, 65536])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--flops", metavar="TEACHER", help="count the float64 work of stage 1 for this teacher instead of timing")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--subset-size", type=int, default=5000, help="profile.subset_size")
    parser.add_argument("--per-class", type=int, default=500, help="|B_k|: min(profile.per_class_cap, images per class)")
    parser.add_argument("--tflops", type=float, nargs="*", default=[], help="float64 rates to convert the count at")
    args = parser.parse_args()
    if args.flops:
        print_flops(args)
        return

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
