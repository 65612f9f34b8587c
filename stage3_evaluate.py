#!/usr/bin/env python3
"""Stage 3: accuracy and epochs-to-target tables and plots over every finished run.

Writes <out>/accuracy.{csv,md,tex}, epochs_to_target.{csv,md}, unfinished.{csv,md} and PNG plots,
and prints the Markdown tables. Unfinished or failed runs are listed, never averaged in.

Examples:
  python stage3_evaluate.py
  python stage3_evaluate.py --dataset fashion_mnist --methods ce kd fitnet ours --target 90
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import cli


def body() -> int:
    p = cli.Parser(__doc__)
    p.add_argument("--artifacts", default="artifacts", help="artifacts directory to scan (default: artifacts)")
    p.add_argument("--out", default=None, help="output directory (default: <artifacts>/reports)")
    p.add_argument("--dataset", nargs="*", default=None, help="only these datasets")
    p.add_argument("--pairs", nargs="*", default=None, help="only these teacher:student pairs, e.g. resnet34:resnet9")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods")
    p.add_argument("--target", type=float, default=None, help="target accuracy in percent (default: the CE student's best)")
    p.add_argument("--drop-outliers", action="store_true", help="the paper's rule: drop runs more than 1 point below the best run")
    args = p.parse_intermixed_args()
    artifacts = Path(args.artifacts)
    out = Path(args.out) if args.out else artifacts / "reports"
    _check_args(args, artifacts, out)

    from common.report import run

    pairs = [pair.replace(":", "__") for pair in args.pairs] if args.pairs else None
    result = run(artifacts, out, datasets=args.dataset, pairs=pairs, methods=args.methods, target=args.target, drop_outliers=args.drop_outliers)
    for name, text in result["markdown"].items():
        print(f"\n## {name}\n\n{text}")
    print(f"reports written to {out} (tables: accuracy, epochs_to_target, unfinished as .csv/.md, accuracy.tex; plots in {out / 'plots'})")
    return 0


def _check_args(args: argparse.Namespace, artifacts: Path, out: Path) -> None:
    """Bad flags stop here with one line, before anything is read or written."""
    from common.artifacts import check_writable
    from common.errors import ConfigError

    if args.target is not None and not 0 < args.target <= 100:
        raise ConfigError(f"--target {args.target:g} is not an accuracy; give a percentage in (0, 100], e.g. --target 90")
    if artifacts.exists() and not artifacts.is_dir():
        raise ConfigError(f"--artifacts {artifacts} is a file; pass the directory stages 1-2 wrote to")
    check_writable(out, "--out")


if __name__ == "__main__":
    cli.main(body)
