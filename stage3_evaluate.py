#!/usr/bin/env python3
"""Stage 3: accuracy and epochs-to-target tables and plots over every finished run.

Writes <out>/accuracy.{csv,md,tex}, headroom.csv, epochs_to_target.{csv,md}, unfinished.{csv,md},
export.{csv,md} and export_runs.csv (once `make export` has run), replaced_images.md (when a run
replaced undecodable files: dataset.bad_images=skip), PNG plots and report.html (all of them, and any layer-study report below <out>, in one offline
page), and prints the Markdown tables. Unfinished or failed runs are listed, never averaged in.

With --study: the layer-selection study's report instead (common/study/runner.py), for the config the
study ran with (the same --config, flags and overrides as `make study`; overrides after `--`).
Writes layer_study.{csv,md}, layer_study_{controls,correlations,student_maps,runs}.csv and plots to --out
(default <artifacts>/reports/layer_study/<dataset>/<teacher>__<student>).

Examples:
  python stage3_evaluate.py
  python stage3_evaluate.py --dataset fashion_mnist --methods ce kd fitnet ours --target 90
  python stage3_evaluate.py --study --config configs/demo.yaml --seeds "0 1 2" -- train.epochs=3
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import cli


def body() -> int:
    from common.artifacts.discovery import PAIRS_HELP

    p = cli.Parser(__doc__)
    p.add_argument("--artifacts", default=None, help="artifacts directory to scan (default: artifacts; with --study: the config's)")
    p.add_argument("--out", default=None, help="output directory (default: <artifacts>/reports)")
    p.add_argument("--dataset", nargs="*", default=None, help="only these datasets")
    p.add_argument("--pairs", nargs="*", default=None, help=PAIRS_HELP)
    p.add_argument("--methods", nargs="*", default=None, help="only these methods")
    p.add_argument("--target", type=float, default=None, help="target accuracy in percent (default: the CE student's best)")
    p.add_argument("--drop-outliers", action="store_true", help="the paper's rule: drop runs more than 1 point below the best run")
    study = p.add_argument_group("layer-selection study (--study; the flags and overrides `make study` ran with)")
    study.add_argument("--study", action="store_true", help="write the layer-selection study's report instead")
    study.add_argument("--config", default=None, help="YAML config the study ran with")
    study.add_argument("--teacher", default=None, help="teacher model name (sets teacher.name)")
    study.add_argument("--student", default=None, help="student model name (sets student.name)")
    study.add_argument("--data-root", default=None, help="local dataset directory (sets dataset.root)")
    study.add_argument("--seeds", default=None, help='the study\'s seeds, e.g. --seeds "0 1 2" (sets seeds)')
    from common.study.runner import add_plan_flags

    add_plan_flags(study)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"--study only: {cli.OVERRIDE_HELP} (after --)")
    args = p.parse_intermixed_args()
    if args.study:
        return _study(args)
    _refuse_study_flags(args)
    artifacts = Path(args.artifacts or "artifacts")
    out = Path(args.out) if args.out else artifacts / "reports"
    _check_args(args, artifacts, out)

    from common.report.runner import run

    result = run(artifacts, out, datasets=args.dataset, pairs=args.pairs, methods=args.methods, target=args.target, drop_outliers=args.drop_outliers)
    for name, text in result["markdown"].items():
        print(f"\n## {name}\n\n{text}")
    from common.report.page import write_html

    page = write_html(out)  # every table and plot under `out`, the layer study's too when it is there
    print(f"reports written to {out} (tables: accuracy, headroom, epochs_to_target, unfinished, export as .csv/.md, accuracy.tex; plots in {out / 'plots'}; all in one page: {page})")
    return 0


def _study(args: argparse.Namespace) -> int:
    """The study report: the config as stage 2 built it for the study, then common.study.runner.run."""
    from common.errors import ConfigError
    from common.study import runner as study

    for flag in ("pairs", "methods", "target"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} does not apply to --study; the study's pair and arms come from its config")
    if args.drop_outliers:
        raise ConfigError("--drop-outliers does not apply to --study: every seed enters the paired differences")
    datasets = args.dataset or []
    if len(datasets) > 1:
        hint = "; put overrides after --, e.g. --study --dataset fashion_mnist -- train.epochs=3" if any("=" in d for d in datasets) else ""
        raise ConfigError(f"--study reports one dataset, got --dataset {' '.join(datasets)}{hint}")
    args.dataset = datasets[0] if datasets else None
    cfg = cli.build_config(args, {"student": "student.name"})  # --artifacts too, else the config's
    out = Path(args.out) if args.out else study.default_out(cfg)
    _check_args(args, Path(cfg.artifacts), out)
    result = study.run(cfg, out, **study.plan_options(args))
    print(result["markdown"])
    if "teachers" in result:  # several teachers: the multi-teacher arms (common/study/multi.py)
        print(f"study report written to {out} (multi_teacher.md, multi_teacher_*.csv)")
        return 0
    print(f"study report written to {out} (layer_study.md, layer_study*.csv; plots in {out / 'plots'})")
    return 0


def _refuse_study_flags(args: argparse.Namespace) -> None:
    from common.errors import ConfigError

    given = [f"--{name.replace('_', '-')}" for name in ("config", "teacher", "student", "data_root", "seeds", "layers")
             if getattr(args, name) is not None]
    if args.overrides:
        given.append(" ".join(args.overrides))
    if given:
        raise ConfigError(f"{', '.join(given)} only apply with --study (the layer-selection study's report)")


def _check_args(args: argparse.Namespace, artifacts: Path, out: Path) -> None:
    """Bad flags stop here with one line, before anything is read or written."""
    from common.artifacts.layout import check_writable
    from common.artifacts.discovery import pair_dir_name
    from common.errors import ConfigError

    for pair in args.pairs or []:
        pair_dir_name(pair)  # a pair that does not read one way stops here, before the scan
    if args.target is not None and not 0 < args.target <= 100:
        raise ConfigError(f"--target {args.target:g} is not an accuracy; give a percentage in (0, 100], e.g. --target 90")
    if artifacts.exists() and not artifacts.is_dir():
        raise ConfigError(f"--artifacts {artifacts} is a file; pass the directory stages 1-2 wrote to")
    check_writable(out, "--out")


if __name__ == "__main__":
    cli.main(body)
