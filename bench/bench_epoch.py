#!/usr/bin/env python3
"""Epoch time of `ours` from the feature cache vs `ce` alone vs `ours` with a live teacher.

All three run in this one process, interleaved over repeats, so the ratios compare like with
like on a noisy machine. Epoch time is the training part only (metrics.csv epoch_time_s: no
evaluation). The teacher and its profile come from the config's artifacts (built if missing);
the student runs go to a temporary directory.

  python bench/bench_epoch.py --config configs/demo.yaml --repeats 3
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

from common import artifacts, distill, profile  # noqa: E402
from common.cache import epoch_batches  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from common.data import Data, load_data  # noqa: E402
from common.methods import build_distiller, resolve_method  # noqa: E402
from common.models import create_model  # noqa: E402

VARIANTS = {
    "ce": {"method": "ce", "teacher_source": "auto"},
    "ours (cache)": {"method": "ours", "teacher_source": "cache"},
    "ours (live teacher)": {"method": "ours", "teacher_source": "live"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides + ["train.progress=false", "teacher_train.progress=false"])
    data = load_data(cfg.dataset)
    profile.run(cfg, data)  # teacher + profile + features.h5, skipped when done
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.repeats):
        for name, variant in VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                # The student run goes to `tmp`; the teacher directory is linked in unchanged.
                link = Path(tmp) / cfg.dataset.name / artifacts.teacher_id(cfg, data)
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
    base = statistics.median(times["ce"])
    print(f"\nepoch time, median of {args.repeats} (training only, {len(data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed))} images):")
    print("| variant | epoch s (median) | all runs s | ratio to ce |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {med / base:.2f} |")
    cache_vs_live = statistics.median(times["ours (cache)"]) / statistics.median(times["ours (live teacher)"])
    print(f"ours cache / ours live = {cache_vs_live:.2f}")
    breakdown(cfg, data)


def breakdown(cfg: Config, data: Data) -> None:
    """Seconds of one epoch spent gathering teacher features vs in the student's step, ce and ours."""
    rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
    ours = resolve_method(dataclasses.replace(cfg.method, name="ours"))
    teacher_layers, student_layers = distill.resolve_pairs(cfg, ours, data)
    all_shapes = profile.layer_shapes(cfg, data)
    shapes = {i: all_shapes[i] for i in teacher_layers}
    source = distill._teacher_source(cfg, data, ours, teacher_layers, torch.device("cpu"))
    print("\none epoch, seconds by part (same process):")
    print("| method | gather teacher features | student forward | backward + step |")
    print("|---|---|---|---|")
    for name in ("ce", "ours"):
        spec = resolve_method(dataclasses.replace(cfg.method, name=name))
        torch.manual_seed(0)
        student = create_model(cfg.student.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=cfg.student.width)
        uses = name == "ours"
        model = build_distiller(
            spec, student, num_classes=data.num_classes, input_shape=(data.in_channels, data.image_size, data.image_size),
            teacher_layers=teacher_layers if uses else [], student_layers=student_layers if uses else [],
            teacher_shapes=shapes if uses else {}, batch_size=cfg.train.batch_size,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        parts = [0.0, 0.0, 0.0]
        for idx in epoch_batches(rows, cfg.train.batch_size, torch.Generator().manual_seed(0)):
            t0 = time.perf_counter()
            x, y = data.normalize(data.train.images[idx]), data.train.labels[idx]
            feats, logits = source.batch(idx, x) if uses else ({}, None)
            t1 = time.perf_counter()
            _, losses = model.forward_train(x, y, feats, logits)
            t2 = time.perf_counter()
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            t3 = time.perf_counter()
            for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                parts[i] += dt
        print(f"| {name} | {parts[0]:.2f} | {parts[1]:.2f} | {parts[2]:.2f} |")


if __name__ == "__main__":
    main()
