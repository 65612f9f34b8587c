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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from common import artifacts, distill, profile  # noqa: E402
from common.config import load_config  # noqa: E402
from common.data import load_data  # noqa: E402

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


if __name__ == "__main__":
    main()
