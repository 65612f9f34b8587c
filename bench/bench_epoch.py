#!/usr/bin/env python3
"""Epoch time of `ours` from the feature cache vs `ce` alone vs `ours` with a live teacher.

All three run in this one process, interleaved over repeats, so the ratios compare like with
like on a noisy machine. Epoch time is the training part only (metrics.csv epoch_time_s: no
evaluation). The teacher and its profile come from the config's artifacts (built if missing);
the student runs go to a temporary directory.

Two sizes (goal of issue 9: ours (cache) / ce <= 1.15 at both):
  demo   configs/demo.yaml: Fashion-MNIST 28x28x1, quarter-width ResNet34 -> ResNet9, 2 000 images.
  cifar  configs/cifar100.yaml on generated CIFAR-100 pickles (32x32x3, 100 classes; the
         generator of bench_profile_scale.py): full-width ResNet34 teacher trained 1 epoch,
         full-width ResNet9 student, the profile's 4 selected layers, --n-train images.
         The teacher is keyed by the data's content, so a rerun with the same --n-train and
         artifacts directory reuses it.

After the table: one epoch split by part (gather / student forward / feature term / backward +
step), with the ce and ours steps interleaved batch by batch (the steadiest ratio on a loaded
machine), and the FLOPs of one ours step against one ce step (what the projections add: the
floor of the ratio where convolutions dominate).

  python bench/bench_epoch.py --repeats 3                       # demo size
  python bench/bench_epoch.py --size cifar --no-live            # CIFAR size; the first run trains the teacher
  python bench/bench_epoch.py --size cifar --no-live "profile.layers=[12,13,14,15]"   # the paper's CIFAR-100 layers
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_profile_scale import write_cifar100  # noqa: E402  (bench/ is this script's sys.path[0])
from common import distill
from common.artifacts import layout as artifacts
from common.profile import runner as profile  # noqa: E402
from common.cache.reader import epoch_batches  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from common.data.registry import Data, load_data  # noqa: E402
from common.layers.tables import layer_shapes  # noqa: E402
from common.methods import build_distiller, resolve_method  # noqa: E402
from common.models import create_model  # noqa: E402

VARIANTS = {
    "ce": {"method": "ce", "teacher_source": "auto"},
    "ours (cache)": {"method": "ours", "teacher_source": "cache"},
    "ours (live teacher)": {"method": "ours", "teacher_source": "live"},
}
DEFAULT_CONFIG = {"demo": "configs/demo.yaml", "cifar": "configs/cifar100.yaml"}


def cifar_overrides(data_root: Path, n_train: int) -> list[str]:
    """A 1-epoch full-width teacher and a small profile: their quality does not change the cost."""
    return [
        f"dataset.root={data_root}", "teacher.width=1.0", "student.width=1.0",
        "teacher_train.epochs=1", f"teacher_train.train_subset={n_train}", f"train.train_subset={n_train}",
        "profile.subset_size=1000", "profile.per_class_cap=20",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(DEFAULT_CONFIG), default="demo")
    p.add_argument("--config", default=None, help="default: configs/demo.yaml (demo), configs/cifar100.yaml (cifar)")
    p.add_argument("--repeats", type=int, default=3, help="one-epoch stage-2 runs per variant (0: breakdown only)")
    p.add_argument("--n-train", type=int, default=2000, help="cifar: generated training images = train subset (default 2000)")
    p.add_argument("--n-test", type=int, default=500, help="cifar: generated test images (evaluation is not timed)")
    p.add_argument("--passes", type=int, default=3, help="epochs of the interleaved by-part breakdown (default 3; 0: none)")
    p.add_argument("--no-live", action="store_true", help="skip 'ours (live teacher)' (a full teacher forward per batch)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); 1 is steadier on a loaded machine")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {name: v for name, v in VARIANTS.items() if not (args.no_live and v["teacher_source"] == "live")}
    with tempfile.TemporaryDirectory() as data_tmp:
        overrides = list(args.overrides)
        if args.size == "cifar":
            write_cifar100(Path(data_tmp), args.n_train, args.n_test, classes=100)
            overrides = cifar_overrides(Path(data_tmp), args.n_train) + overrides
        config = args.config or DEFAULT_CONFIG[args.size]
        cfg = load_config(config, overrides + ["train.progress=false", "teacher_train.progress=false"])
        data = load_data(cfg.dataset)
        bench(cfg, data, variants, args.repeats, args.passes, cfg.train.channels_last, f"{args.size} size ({config}, threads {torch.get_num_threads()})")


def bench(cfg: Config, data: Data, variants: dict[str, dict[str, str]], repeats: int, passes: int, channels_last: bool, title: str) -> None:
    profile.run(cfg, data)  # teacher + profile + features.h5, skipped when done
    print(f"\n{title}")
    if repeats > 0:
        epoch_table(cfg, data, variants, repeats)
    if passes > 0:
        breakdown(cfg, data, passes, channels_last)


def epoch_table(cfg: Config, data: Data, variants: dict[str, dict[str, str]], repeats: int) -> dict[str, list[float]]:
    """Whole stage-2 runs of one epoch each (common.distill.run, so the project's loop), interleaved;
    prints the table and returns each variant's epoch seconds per repeat (bench/gpu_check.py)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        names = list(variants) if rep % 2 == 0 else list(variants)[::-1]  # a drift in load favours none
        for name in names:
            variant = variants[name]
            with tempfile.TemporaryDirectory() as tmp:
                # The student run goes to `tmp`; the teacher directory is linked in unchanged.
                link = Path(tmp) / cfg.dataset.name / artifacts.teacher_dir(cfg, data).name
                link.parent.mkdir(parents=True)
                os.symlink(artifacts.teacher_dir(cfg, data).resolve(), link)
                run_cfg = dataclasses.replace(
                    cfg,
                    artifacts=tmp,
                    method=dataclasses.replace(cfg.method, name=variant["method"]),
                    train=dataclasses.replace(cfg.train, epochs=1, teacher_source=variant["teacher_source"]),
                )
                result = distill.run(run_cfg, seeds=[rep])[0]
                times[name].append(float(pd.read_csv(result.dir / "metrics.csv")["epoch_time_s"].iloc[0]))
    n_images = len(data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed))
    print(f"epoch time, median of {repeats} (training only, {n_images} images, batch {cfg.train.batch_size}):")
    print("| variant | epoch s (median) | all runs s | ratio to ce (median of the repeats' ratios) | each repeat's ratio |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        ratios = [v / c for v, c in zip(values, times["ce"])]  # paired: same repeat, minutes apart at most
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{statistics.median(ratios):.3f} | {', '.join(f'{r:.2f}' for r in ratios)} |")
    if "ours (cache)" in times and "ours (live teacher)" in times:
        cache_vs_live = statistics.median(times["ours (cache)"]) / statistics.median(times["ours (live teacher)"])
        print(f"ours cache / ours live = {cache_vs_live:.2f}")
    return times


def breakdown(cfg: Config, data: Data, passes: int, channels_last: bool) -> None:
    """One epoch of ce and ours (cache) by part, the two steps interleaved batch by batch (the
    steadiest ratio on a loaded machine), and the FLOPs of one step of each."""
    rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
    ours = resolve_method(dataclasses.replace(cfg.method, name="ours"))
    teacher_layers, student_layers = distill.resolve_layer_lists(cfg, ours, data)
    all_shapes = layer_shapes(cfg, data)
    shapes = {i: all_shapes[i] for i in teacher_layers}
    source = distill._teacher_source(cfg, data, ours, teacher_layers, torch.device("cpu"))
    steps = {name: _step_fn(cfg, data, name, source, teacher_layers, student_layers, shapes, channels_last) for name in ("ce", "ours")}
    batches = epoch_batches(rows, cfg.train.batch_size, torch.Generator().manual_seed(0))
    flops: dict[str, float] = {}
    for name, step in steps.items():  # also the warm-up
        with FlopCounterMode(display=False) as counter:
            step(batches[0], [0.0] * 4)
        flops[name] = counter.get_total_flops() / 1e9
    parts = {name: [0.0] * 4 for name in steps}
    pair_ratios: list[float] = []
    for _ in range(passes):
        for j, idx in enumerate(batches):
            took = {name: steps[name](idx, parts[name]) for name in (("ce", "ours") if j % 2 == 0 else ("ours", "ce"))}
            pair_ratios.append(took["ours"] / took["ce"])
    layout = "channels_last" if channels_last else "NCHW"
    print(f"\none epoch by part, seconds, mean of {passes} (ce and ours steps interleaved batch by batch, {layout}; "
          f"teacher layers {teacher_layers}: {', '.join('x'.join(map(str, shapes[i])) for i in teacher_layers)}):")
    print("| method | gather teacher features | student forward | feature term forward | backward + step | total | step GFLOP (fwd + bwd) |")
    print("|---|---|---|---|---|---|---|")
    for name, values in parts.items():
        print(f"| {name} | {' | '.join(f'{v / passes:.2f}' for v in values)} | {sum(values) / passes:.2f} | {flops[name]:.2f} |")
    print(f"ours / ce: step time {sum(parts['ours']) / sum(parts['ce']):.3f} (median of the {len(pair_ratios)} paired steps "
          f"{statistics.median(pair_ratios):.3f}); step FLOPs (convolutions and matmuls) {flops['ours'] / flops['ce']:.3f}")


def _step_fn(
    cfg: Config, data: Data, name: str, source, teacher_layers: list[int], student_layers: list[int],
    shapes: dict[int, tuple[int, ...]], channels_last: bool,
):
    """A training step of method `name` (fresh student, AdamW) that adds its seconds by part to
    `parts` and returns its total."""
    spec = resolve_method(dataclasses.replace(cfg.method, name=name))
    torch.manual_seed(0)
    student = create_model(cfg.student.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=cfg.student.width)
    uses = spec.feature_loss != "none"
    model = build_distiller(
        spec, student, num_classes=data.num_classes, input_shape=(data.in_channels, data.image_size, data.image_size),
        teacher_layers=teacher_layers if uses else [], student_layers=student_layers if uses else [],
        teacher_shapes=shapes if uses else {}, batch_size=cfg.train.batch_size,
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)

    def step(idx: torch.Tensor, parts: list[float]) -> float:
        t0 = time.perf_counter()
        x, y = data.normalize(data.train.images[idx]), data.train.labels[idx]
        feats, logits = source.batch(idx, x) if uses else ({}, None)
        t1 = time.perf_counter()
        # forward_train in its two halves (the Distiller's own pieces), to time them apart
        logits_s, student_features = model.student_forward(x)
        losses = model.logit_losses(logits_s, y, logits)
        t2 = time.perf_counter()
        if model.feature_term is not None:
            losses["feat"] = model.spec.feature_weight * model.feature_term(student_features, model.ordered_teacher_features(feats))
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        t4 = time.perf_counter()
        for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[i] += dt
        return t4 - t0

    return step


if __name__ == "__main__":
    main()
