#!/usr/bin/env python3
"""`make export` on the four registry students at full width, CIFAR shapes (3 x 32 x 32).

For each student (resnet9, vgg11, mobilenetv2, vit_ett) a finished run directory is written the
way stage 2 writes one, with random weights (what a student costs does not depend on how well
it is trained), on a generated CIFAR-shaped dataset in the real pickle layout; then
`common.export.runner.export_all` exports them all exactly as `make export` does and the export table
is printed (params, MACs, ONNX size, CPU latency at batch 1 and 64 for ONNX Runtime and
PyTorch eager, max abs logit difference), followed by the quartiles of each latency so the
noise of the machine can be judged.

Usage:
  .venv/bin/python bench/bench_export.py [--threads 1] [--repeats 20] [--warmup 5] [--classes 100]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.artifacts import discovery
from common.export import runner as export
from common.report import exports as export_tables  # noqa: E402
from tests.fakedata import make_cifar10, make_cifar100  # noqa: E402
from tests.test_export import write_run  # noqa: E402

STUDENTS = ["resnet9", "vgg11", "mobilenetv2", "vit_ett"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", nargs="*", default=STUDENTS)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, choices=[10, 100], default=100, help="CIFAR-10 or CIFAR-100 head")
    p.add_argument("--threads", type=int, default=None, help="default: every core this process may use")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-images", type=int, default=1000)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    dataset = f"cifar{args.classes}"
    with tempfile.TemporaryDirectory() as tmp:
        data_root, artifacts = Path(tmp) / "data", Path(tmp) / "artifacts"
        (make_cifar10 if args.classes == 10 else make_cifar100)(data_root, n_train=200, n_test=args.check_images, seed=0)
        for student in args.students:
            write_run(artifacts, data_root, student, width=args.width, dataset=dataset)
        settings = export.ExportSettings(threads=args.threads, warmup=args.warmup, repeats=args.repeats, check_images=args.check_images)
        tic = time.perf_counter()
        results = export.export_all(artifacts, settings=settings)
        elapsed = time.perf_counter() - tic
        table = export_tables.export_table(discovery.find_runs(artifacts))
        print(f"\n## {dataset} shapes, width {args.width}, {args.check_images} test images checked\n")
        print(export_tables.export_markdown(export_tables.export_summary(table)))
        print("| student | ONNX (bytes) | TorchScript (bytes) | student.pt (bytes) | ORT b1 q1-q3 | PyTorch b1 q1-q3 | ORT b64 q1-q3 | PyTorch b64 q1-q3 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            rec, lat = r.record, r.record["latency"]
            spread = [f"{lat[b][rt]['q1']:.2f}-{lat[b][rt]['q3']:.2f}" for b in ("batch1", "batch64") for rt in ("onnxruntime", "pytorch")]
            print(f"| {rec['student']['name']} | {rec['onnx']['bytes']:,} | {rec['torchscript']['bytes']:,} | {rec['source']['bytes']:,} | " + " | ".join(spread) + " |")
        print(f"\nexport_all took {elapsed:.0f} s for {len(results)} students (export, checks and timing)")


if __name__ == "__main__":
    main()
