#!/usr/bin/env python3
"""Epoch time of `ours` from two teachers' feature caches vs from one teacher's, same total layers.

The goal: a cached multi-teacher epoch costs at most 1.1x a single-teacher cached epoch with the
same total number of distilled layers. Both are whole stage-2 runs of one epoch (common.distill.run,
the project's loop; metrics.csv epoch_time_s, training only), interleaved over repeats in this one
process and in alternating order, so load drifts on a noisy machine favour neither; the ratio is the
median of the repeats' paired ratios.

  single A  ours from teacher A alone, its top-k by Q (k = 4)
  multi     ours from A + B with teacher_rule=per_teacher: the top k/2 of each (4 layers in all)
  single B  ours from teacher B alone, its top-k by Q

The layers differ between the variants (each teacher's own top layers, of their own shapes), so the
distillation terms differ in size too; the mean of the two single-teacher epochs is the closest
like-for-like reference for a run that takes half its layers from each.

Small size (the default): generated Fashion-MNIST-shaped data (28x28x1, 10 classes, --n-train
images, all of them the students' training rows), quarter-width ResNet34 and VGG19 teachers trained
one epoch, a quarter-width ResNet9 student, batch 128. Everything goes to a temporary directory.

  python bench/bench_multi_teacher.py --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import distill  # noqa: E402
from common.config import load_config  # noqa: E402
from common.data.registry import load_data  # noqa: E402
from common.profile import multi  # noqa: E402
from tests.fakedata import make_fashion_mnist  # noqa: E402


def overrides(root: Path, artifacts: Path, teachers: str, student: str) -> list[str]:
    return [
        f"dataset.root={root}", f"artifacts={artifacts}", f"teachers=[{teachers}]", "teacher.width=0.25",
        f"student.name={student}", "student.width=0.25", "teacher_train.epochs=1", "teacher_train.batch_size=128",
        "train.epochs=1", "train.batch_size=128", "profile.k=4", "profile.subset_size=500", "profile.per_class_cap=50",
        "teacher_train.progress=false", "train.progress=false", "profile.progress=false", "method.name=ours",
        "train.teacher_source=cache",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="one-epoch runs per variant, interleaved (default 5)")
    p.add_argument("--n-train", type=int, default=2000, help="generated training images (default 2000)")
    p.add_argument("--teachers", default="resnet34,vgg19", help="teacher A,B (default resnet34,vgg19)")
    p.add_argument("--student", default="resnet9")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a = args.teachers.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        root, art = Path(tmp) / "data", Path(tmp) / "artifacts"
        make_fashion_mnist(root, n_train=args.n_train, n_test=200, seed=0)
        pair = load_config(None, [*overrides(root, art, args.teachers, args.student), "teacher_rule=per_teacher"])
        single_a, single_b = (multi.config_of(pair, t) for t in multi.teacher_configs(pair))
        data = load_data(pair.dataset)
        tic = time.perf_counter()
        multi.run(pair, data)  # both teachers, their profiles and caches (once)
        print(f"stage 1 for both teachers: {time.perf_counter() - tic:.1f} s")
        b = args.teachers.split(",")[1]
        variants = {f"single ({a}, 4 layers)": single_a, "multi (per_teacher, 2 + 2 layers)": pair, f"single ({b}, 4 layers)": single_b}
        times: dict[str, list[float]] = {name: [] for name in variants}
        layers: dict[str, str] = {}
        for rep in range(args.repeats):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                cfg = dataclasses.replace(variants[name], seeds=[rep])
                result = distill.run(cfg, data=data)[0]
                times[name].append(float(pd.read_csv(result.dir / "metrics.csv")["epoch_time_s"].iloc[0]))
                layers[name] = " ".join(_run_layers(result.dir))
    names = list(variants)
    ratios = [m / s for s, m in zip(times[names[0]], times[names[1]])]
    ratios_b = [m / s for s, m in zip(times[names[2]], times[names[1]])]
    ratios_mean = [2 * m / (s + t) for s, m, t in zip(times[names[0]], times[names[1]], times[names[2]])]
    print(f"\nepoch time (training only, {args.n_train} images, batch 128, threads {torch.get_num_threads()}), {args.repeats} interleaved repeats:")
    print("| variant | teacher layers | epoch s (median) | all runs s |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {layers[name]} | {statistics.median(times[name]):.2f} | {', '.join(f'{v:.2f}' for v in times[name])} |")
    for label, values in ((f"multi / single {a}", ratios), (f"multi / single {b}", ratios_b), ("multi / mean of the two singles", ratios_mean)):
        print(f"{label} = {statistics.median(values):.3f} (median of the paired ratios {', '.join(f'{r:.2f}' for r in values)}; goal <= 1.1)")


def _run_layers(run_dir: Path) -> list[str]:
    import yaml

    run = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]
    return [str(x) for x in run["teacher_layers"]]


if __name__ == "__main__":
    main()
