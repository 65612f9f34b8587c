"""The study's multi-teacher arms: does a second teacher help, and does Q say which teacher is better?

For one student and teachers A and B (config `teachers: [A, B]`), paired by seed:

    <A>_alone        ours from A alone: exactly the single-teacher study's `ours` runs of A
    <B>_alone        ours from B alone
    pooled           ours from A+B, the top-k by Q over both teachers' layers
    per_teacher      ours from A+B, the top k/2 by Q of each
    baseline_half    stl_seplin from A+B: half of each teacher's baseline list
    ce               the CE student: the single-teacher study's `ce` runs of A

`make study TEACHER="A B"` runs them through the same shell loop as the single-teacher study
(`plan_lines`), and `stage3_evaluate.py --study` with the same flags writes the report (`run`):
each arm's accuracy with the teacher of every distilled layer, the teachers' best Q beside their
students' accuracy, and every arm's paired difference to the better single teacher.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from common.artifacts import layout as artifacts
from common.config import Config
from common.errors import ConfigError
from common.profile import multi
from common.study.plan import CONTROL, REFERENCE, Arm, arm_config, check_base_config

MULTI = "multi"  # the kind of an arm that distils from several teachers


def _teacher_overrides(t: Any) -> tuple[str, ...]:
    """One teacher as the `teacher` section, every value set, so the arm is that teacher alone
    whatever the config's `teacher` section says (a name-only entry already took its values)."""
    pretrained = "null" if t.pretrained is None else str(t.pretrained)
    finetune = str(t.finetune).lower() if isinstance(t.finetune, bool) else t.finetune
    return ("teachers=[]", f"teacher.name={t.name}", f"teacher.width={t.width}", f"teacher.pretrained={pretrained}", f"teacher.finetune={finetune}")


def multi_arms(cfg: Config) -> list[Arm]:
    """The arms, in report order. `ours` arms name Q's layers by word ("selected" when the
    profile selects by Q, as the single-teacher study does, so the alone arms are its runs)."""
    check_base_config(cfg)
    teachers = multi.teacher_configs(cfg)
    if len(teachers) != 2:
        raise ConfigError(f"the multi-teacher study compares two teachers, got {len(teachers)}; list two in teachers or --teacher \"A B\"")
    by_q = () if cfg.profile.criterion == "Q" else ("method.teacher_layers=Q",)
    ours = ("method.name=ours", *by_q)
    k = cfg.profile.k
    a, b = teachers
    return [
        Arm(f"{a.name}_alone", CONTROL, f"ours from {a.name} alone (top-{k} by Q)", (*_teacher_overrides(a), *ours)),
        Arm(f"{b.name}_alone", CONTROL, f"ours from {b.name} alone (top-{k} by Q)", (*_teacher_overrides(b), *ours)),
        Arm("pooled", MULTI, f"ours from {a.name}+{b.name}: top-{k} by Q over both", (*ours, "teacher_rule=pooled")),
        Arm("per_teacher", MULTI, f"ours from {a.name}+{b.name}: top-{k // 2} by Q of each", (*ours, "teacher_rule=per_teacher")),
        Arm("baseline_half", MULTI, f"stl_seplin from {a.name}+{b.name}: half of each baseline list", ("method.name=stl_seplin",)),
        Arm("ce", REFERENCE, "CE-only student (no teacher)", (*_teacher_overrides(a), "method.name=ce")),
    ]


def plan_lines(cfg: Config) -> list[str]:
    """`name<TAB>overrides`, one arm a line, for the shell loop of `make study`."""
    return [f"{arm.name}\t{arm.command}" for arm in multi_arms(cfg)]


def arm_dirs(cfg: Config, data: Any, arm: Arm, seeds: Sequence[int]) -> tuple[dict[int, Path], list[str], list[int]]:
    """Seed -> the run directory stage 2 gives the arm, with its teacher layers named by
    teacher ('resnet34:14') and its student layers; nothing is built."""
    from common import distill
    from common.train import multi_teacher
    from common.methods import resolve_run_method

    arm_cfg = arm_config(cfg, arm)
    spec = resolve_run_method(arm_cfg)
    if multi.is_multi(arm_cfg):
        plan = multi_teacher.resolve(arm_cfg, spec, data, multi.manifest_for(arm_cfg, data))
        return multi_teacher.run_dirs(arm_cfg, data, spec, plan, list(seeds)), plan.labels(), plan.student_layers
    single = multi.single_config(arm_cfg)
    teacher_layers, student_layers = distill.resolve_layer_lists(single, spec, data) if spec.needs_teacher else ([], [])
    dirs = distill.run_dirs(single, data, spec, teacher_layers, list(seeds))
    return dirs, ([f"{single.teacher.name}:{i}" for i in teacher_layers]), list(student_layers)


def _accuracy(run_dir: Path) -> float:
    from common.artifacts.discovery import read_metrics, run_summary

    if not (run_dir / artifacts.DONE).exists():
        return float("nan")
    return float(run_summary(read_metrics(run_dir))["best_test_acc"])


def collect(cfg: Config, data: Any, arms: Sequence[Arm]) -> pd.DataFrame:
    """One row per arm x seed: the run's best-epoch test accuracy (NaN while unfinished)."""
    rows = []
    for arm in arms:
        dirs, labels, students = arm_dirs(cfg, data, arm, cfg.seeds)
        for seed, run_dir in dirs.items():
            rows.append(dict(arm=arm.name, kind=arm.kind, seed=seed, best_test_acc=_accuracy(run_dir),
                             teacher_layers=" ".join(labels), student_layers=" ".join(map(str, students)), path=str(run_dir)))
    return pd.DataFrame(rows)


def teacher_table(manifest: multi.MultiManifest, runs: pd.DataFrame) -> pd.DataFrame:
    """Per teacher: its best Q, the mean Q of its top-k, and its student's accuracy alone."""
    from common.report.stats import mean_std

    rows = []
    k = int(manifest.data["k"])
    for t, name in enumerate(manifest.names):
        qs = sorted((float(r["Q"]) for r in manifest.data["layers"] if r["teacher"] == t and math.isfinite(float(r["Q"]))), reverse=True)
        accs = runs[(runs["arm"] == f"{name}_alone")]["best_test_acc"].dropna().tolist()
        mean, std = mean_std(accs)
        rows.append(dict(teacher=name, best_Q=qs[0] if qs else float("nan"), top_k_mean_Q=sum(qs[:k]) / max(1, len(qs[:k])),
                         n=len(accs), acc_mean=mean, acc_std=std))
    return pd.DataFrame(rows)


def arm_table(arms: Sequence[Arm], runs: pd.DataFrame, better: str | None) -> pd.DataFrame:
    """Per arm: accuracy, and the arm minus the better single teacher's arm, paired over seeds."""
    from common.report.stats import mean_std
    from common.study.stats import difference_sentence, paired_difference

    def accs(name: str) -> dict[int, float]:
        done = runs[(runs["arm"] == name)].dropna(subset=["best_test_acc"])
        return dict(zip(done["seed"].astype(int), done["best_test_acc"].astype(float)))

    rows = []
    for arm in arms:
        got = accs(arm.name)
        mean, std = mean_std(list(got.values()))
        layers = runs[runs["arm"] == arm.name]
        row = dict(arm=arm.name, label=arm.label, teacher_layers=layers["teacher_layers"].iloc[0] if len(layers) else "",
                   student_layers=layers["student_layers"].iloc[0] if len(layers) else "", n=len(got), acc_mean=mean, acc_std=std)
        if better is not None and arm.name != better:
            diff = paired_difference(got, accs(better))
            row.update(diff_mean=diff.estimate, diff_low=diff.low, diff_high=diff.high, n_pairs=diff.n,
                       sentence=difference_sentence(arm.name, better, diff))
        rows.append(row)
    return pd.DataFrame(rows)


def findings(teachers: pd.DataFrame, arms: pd.DataFrame) -> list[str]:
    """Which single teacher is better, whether Q predicts it, whether two teachers beat it."""
    out = []
    measured = teachers[teachers["n"] > 0].sort_values("acc_mean", ascending=False)
    if len(measured) < 2:
        return ["Both teachers' alone arms need finished runs to say which teacher is better."]
    best, other = measured.iloc[0], measured.iloc[1]
    if best["acc_mean"] == other["acc_mean"]:
        return [f"{best['teacher']} and {other['teacher']} tie at {best['acc_mean']:.2f} % alone: neither single teacher is better."]
    out.append(f"{best['teacher']} is the better single teacher: {best['acc_mean']:.2f} % against {other['teacher']}'s "
               f"{other['acc_mean']:.2f} % (ours, {int(best['n'])} and {int(other['n'])} seeds).")
    q_pick = teachers.sort_values("best_Q", ascending=False).iloc[0]["teacher"]
    agree = "predicts" if q_pick == best["teacher"] else "**does not predict**"
    out.append(f"Q {agree} it: the higher best Q is {q_pick}'s "
               f"({', '.join(f'{r.teacher} {r.best_Q:.3f}' for r in teachers.itertuples())}).")
    for row in arms[arms["arm"].isin(["pooled", "per_teacher", "baseline_half"])].itertuples():
        if isinstance(row.sentence, str):
            out.append(row.sentence)
    return out


def markdown(title: str, teachers: pd.DataFrame, arms: pd.DataFrame, found: Sequence[str]) -> str:
    lines = [f"# {title}", "", "## Findings", "", *[f"- {s}" for s in found], "", "## Teachers", "",
             "| teacher | best Q | mean Q of its top-k | student accuracy alone (%) | n |", "|---|---|---|---|---|"]
    lines += [f"| {r.teacher} | {r.best_Q:.4f} | {r.top_k_mean_Q:.4f} | {r.acc_mean:.2f} ± {r.acc_std:.2f} | {r.n} |" for r in teachers.itertuples()]
    lines += ["", "## Arms (teacher:layer -> student layer, in pairing order)", "",
              "| arm | what | teacher layers | student layers | accuracy (%) | n | vs the better single teacher |", "|---|---|---|---|---|---|---|"]
    for r in arms.itertuples():
        diff = "" if not isinstance(getattr(r, "diff_mean", None), float) or math.isnan(r.diff_mean) else \
            f"{r.diff_mean:+.2f} ({r.diff_low:+.2f} to {r.diff_high:+.2f})"
        lines.append(f"| {r.arm} | {r.label} | {r.teacher_layers} | {r.student_layers} | {r.acc_mean:.2f} ± {r.acc_std:.2f} | {r.n} | {diff} |")
    return "\n".join(lines) + "\n"


def default_out(cfg: Config) -> Path:
    return Path(cfg.artifacts) / "reports" / "layer_study" / cfg.dataset.name / artifacts.dir_name(artifacts.pair_name(multi.joined_name(cfg), cfg.student.name))


def run(cfg: Config, out_dir: Path | None = None, *, data: Any = None) -> dict[str, Any]:
    """The multi-teacher study report: multi_teacher.md and multi_teacher_{arms,teachers,runs}.csv
    under `out_dir` (default `default_out`). Nothing is trained; stage 1 runs when its manifest
    is missing (as `python -m common.study plan` does)."""
    from common.data.registry import load_data
    from common.files import atomic_write, atomic_write_text

    data = data if data is not None else load_data(cfg.dataset)
    arms = multi_arms(cfg)
    manifest = multi.manifest_for(cfg, data)
    runs = collect(cfg, data, arms)
    teachers = teacher_table(manifest, runs)
    measured = teachers[teachers["n"] > 0].sort_values("acc_mean", ascending=False)
    better = f"{measured.iloc[0]['teacher']}_alone" if len(measured) else None
    table = arm_table(arms, runs, better)
    found = findings(teachers, table)
    title = (f"Multi-teacher study: {' + '.join(manifest.names)} → {cfg.student.name} on {cfg.dataset.name} "
             f"(seeds {', '.join(map(str, cfg.seeds))})")
    text = markdown(title, teachers, table, found)
    out_dir = Path(out_dir) if out_dir is not None else default_out(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("multi_teacher_arms.csv", table), ("multi_teacher_teachers.csv", teachers), ("multi_teacher_runs.csv", runs)):
        atomic_write(out_dir / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    atomic_write_text(out_dir / "multi_teacher.md", text)
    return dict(arms=table, teachers=teachers, runs=runs, findings=found, markdown=text, dir=out_dir)

