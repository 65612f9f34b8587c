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
    p.add_argument("--passes", type=int, default=3, help="epochs of the steps interleaved batch by batch (default 3; 0: none)")
    p.add_argument("--artifacts", default=None, help="keep the teachers here for a rerun (default: a temporary directory)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a = args.teachers.split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        root, art = Path(tmp) / "data", Path(args.artifacts or Path(tmp) / "artifacts")
        make_fashion_mnist(root, n_train=args.n_train, n_test=200, seed=0)
        pair = load_config(None, [*overrides(root, art, args.teachers, args.student), "teacher_rule=per_teacher"])
        single_a, single_b = (multi.config_of(pair, t) for t in multi.teacher_configs(pair))
        data = load_data(pair.dataset)
        tic = time.perf_counter()
        multi.run(pair, data)  # both teachers, their profiles and caches (once)
        print(f"stage 1 for both teachers: {time.perf_counter() - tic:.1f} s")
        b = args.teachers.split(",")[1]
        variants = {f"single ({a}, 4 layers)": single_a, "multi (per_teacher, 2 + 2 layers)": pair, f"single ({b}, 4 layers)": single_b}
        if args.passes > 0:
            interleaved_steps(variants, data, args.passes)
        if args.repeats < 1:
            return
        times: dict[str, list[float]] = {name: [] for name in variants}
        layers: dict[str, str] = {}
        for rep in range(args.repeats):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                cfg = dataclasses.replace(variants[name], seeds=[100 + rep])
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


def interleaved_steps(variants: dict, data, passes: int) -> None:
    """Training steps of every variant (bench_epoch.py's `_step_fn`: fresh student, AdamW, timed by
    part), interleaved batch by batch over `passes` epochs: the steadiest ratio on a loaded machine."""
    from bench_epoch import _step_fn  # bench/ is this script's sys.path[0]
    from common.train import multi_teacher
    from common.layers.tables import layer_shapes
    from common.methods import resolve_run_method

    steps, labels = {}, {}
    for name, cfg in variants.items():
        spec = resolve_run_method(cfg)
        if multi.is_multi(cfg):
            plan = multi_teacher.resolve(cfg, spec, data)
            source = multi_teacher.teacher_source(cfg, data, plan, torch.device("cpu"))
            keys, students = list(range(len(plan.triples))), plan.student_layers
            shapes = {p: layer_shapes(plan.teacher_configs[t], data)[layer] for p, (t, layer, _) in enumerate(plan.triples)}
            labels[name] = plan.labels()
        else:
            keys, students = distill.resolve_layer_lists(cfg, spec, data)
            source = distill._teacher_source(cfg, data, spec, keys, torch.device("cpu"))
            shapes = {i: layer_shapes(cfg, data)[i] for i in keys}
            labels[name] = [f"{cfg.teacher.name}:{i}" for i in keys]
        steps[name] = (source, _step_fn(cfg, data, "ours", source, keys, students, shapes, cfg.train.channels_last))
    cfg = next(iter(variants.values()))
    rows = torch.as_tensor(data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed))
    parts = {name: [0.0] * 4 for name in steps}
    took: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for e in range(passes + 1):  # the first epoch warms up, untimed
        per = {}
        for name, (source, _) in steps.items():
            gen_e = torch.Generator().manual_seed(e)
            per[name] = source.batch_order(rows, cfg.train.batch_size, gen_e)  # each source its own epoch's batches (same rows)
        for j in range(len(per[names[0]])):
            for name in (names if j % 2 == 0 else names[::-1]):
                seconds = steps[name][1](per[name][j], parts[name] if e else [0.0] * 4)
                if e:
                    took[name].append(seconds)
    print(f"\none epoch by part, seconds, mean of {passes} (the variants' steps interleaved batch by batch):")
    print("| variant | teacher layers | gather teacher features | student forward | feature term forward | backward + step | total |")
    print("|---|---|---|---|---|---|---|")
    for name, values in parts.items():
        print(f"| {name} | {' '.join(labels[name])} | {' | '.join(f'{v / passes:.2f}' for v in values)} | {sum(values) / passes:.2f} |")
    multi_name = names[1]
    for other in (names[0], names[2]):
        ratios = [m / s for m, s in zip(took[multi_name], took[other])]
        print(f"{multi_name} / {other}: step time {sum(took[multi_name]) / sum(took[other]):.3f} "
              f"(median of the {len(ratios)} paired steps {statistics.median(ratios):.3f})")
    mean = [2 * m / (a + b) for m, a, b in zip(took[multi_name], took[names[0]], took[names[2]])]
    print(f"{multi_name} / mean of the two singles: step time {2 * sum(took[multi_name]) / (sum(took[names[0]]) + sum(took[names[2]])):.3f} "
          f"(median of the paired steps {statistics.median(mean):.3f}); gather: "
          f"{parts[multi_name][0] / max(1e-9, (parts[names[0]][0] + parts[names[2]][0]) / 2):.2f}x the singles' mean")


def _run_layers(run_dir: Path) -> list[str]:
    import yaml

    run = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]
    return [str(x) for x in run["teacher_layers"]]


if __name__ == "__main__":
    main()
