"""The layer-selection study (issue 10): does Q pick the teacher layers that transfer best?

    python -m common.study plan --config configs/demo.yaml --seeds "0 1 2"   # name<TAB>overrides per arm
    python stage3_evaluate.py --study --config configs/demo.yaml --seeds "0 1 2"

`make study` loops `make distill` over the plan's lines (no training code here), then stage 3
writes the report. The plan (common/study/plan.py) is computed from stage 1's manifest by the
same function in both places; the report finds each arm's runs in the directories stage 2 gives
those overrides (`arm_run_dirs`: the config hash, so a run of other settings never mixes in), read
through stage 3's own discovery (`common.artifacts.discovery.find_runs`).

Report (`<out>/layer_study.{csv,md}`, layer_study_{controls,correlations,student_maps,runs}.csv, plots/):
per teacher layer S, I, E, Q beside the single-layer student's accuracy (best-epoch test
accuracy, METHOD 10; mean and population std over seeds); Spearman's rho of each criterion
with that accuracy and a bootstrap interval over seeds; each control's paired difference to
`ours` over seeds with a t-interval, in words; each student map's (Q's teacher layers into other
student layers) the same way; and plain sentences where Q fails. This module
finds the runs and builds the tables and findings; their Markdown and figures are in
common/study/text.py.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from common.artifacts import layout as artifacts
from common.artifacts.layout import dir_name, pair_name, teacher_dir
from common.config import CRITERIA, Config
from common.artifacts.discovery import find_runs, read_metrics, run_summary
from common.files import atomic_write, atomic_write_text
from common.plots import safe_filename
from common.report.stats import mean_std
from common.profile import multi
from common.study import multi as study_multi
from common.study.plan import CONTROL, RANDOM_DRAWS, RANDOM_SEED, REFERENCE, SINGLE, STUDENT, StudyPlan, arm_run_dirs, plan_for, plan_lines
from common.study.text import plot_controls, plot_criteria, study_markdown
from common.study.stats import LEVEL, N_BOOTSTRAP, Interval, bootstrap_spearman, difference_sentence, paired_difference
from common.report.text import headroom_sentence

OURS_WORDS = "Q's layers (ours)"
OURS_MAP_WORDS = "the student's baseline list (ours)"
NOT_PROFILED = "(no run directory yet: seed 0's ce run is not profiled)"


# ----------------------------------------------------------------------------- runs of each arm


def collect_runs(cfg: Config, data: Any, plan: StudyPlan, manifest: Any) -> pd.DataFrame:
    """One row per arm x seed of `cfg.seeds`: status, best-epoch test accuracy, the layers stage 2
    recorded (run.teacher_layers / run.student_layers) and the path; 'missing' without a directory."""
    pair = pair_name(cfg.teacher.name, cfg.student.name)
    found = find_runs(Path(cfg.artifacts), datasets=[cfg.dataset.name], pairs=[pair])
    index = {(f"{r.method}-{r.variant}", int(r.seed)): r for r in found.itertuples()}
    rows = []
    for arm in plan.arms:
        dirs = arm_run_dirs(cfg, data, arm, cfg.seeds, manifest)
        for seed in (int(s) for s in cfg.seeds):
            run_dir = dirs.get(seed)
            hit = index.get((run_dir.parent.name, seed)) if run_dir is not None else None
            recorded = _recorded_layers(Path(hit.path)) if hit is not None and hit.status == "finished" else (None, None)
            rows.append(dict(
                arm=arm.name, kind=arm.kind, seed=seed,
                status=hit.status if hit is not None else "missing", error=hit.error if hit is not None else "",
                best_test_acc=float(hit.best_test_acc) if hit is not None and hit.status == "finished" else float("nan"),
                teacher_layers=_fmt_layers(arm.teacher_layers), student_layers=_fmt_layers(arm.student_layers),
                recorded_teacher_layers=recorded[0], recorded_student_layers=recorded[1],
                path=hit.path if hit is not None else (str(run_dir) if run_dir is not None else NOT_PROFILED),
            ))
    return pd.DataFrame(rows)


def _recorded_layers(run_dir: Path) -> tuple[str | None, str | None]:
    try:
        run = (yaml.safe_load((run_dir / artifacts.CONFIG).read_text()) or {}).get("run") or {}
    except (OSError, yaml.YAMLError):
        return None, None
    return _fmt_layers(run.get("teacher_layers") or []), _fmt_layers(run.get("student_layers") or [])


def _fmt_layers(layers: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in layers)


def _accuracies(runs: pd.DataFrame, arm: str) -> dict[int, float]:
    done = runs[(runs["arm"] == arm) & (runs["status"] == "finished")]
    return dict(zip(done["seed"].astype(int), done["best_test_acc"].astype(float)))


# ----------------------------------------------------------------------------- tables


def layer_results(plan: StudyPlan, manifest: Any, runs: pd.DataFrame) -> pd.DataFrame:
    """Per single-layer arm: the teacher layer's S, I, E, sqrtIE, Q (stage 1's manifest), the
    student layer it was paired with, n finished seeds and the accuracy's mean and population
    std; rank_Q / rank_acc among the layers measured (1 = highest, ties share the best rank)."""
    stats = {int(row["index"]): row for row in getattr(manifest, "data", manifest)["layers"]}
    top_q = set(getattr(manifest, "data", manifest)["top_k"]["Q"])
    rows = []
    for arm in plan.of_kind(SINGLE):
        layer, accs = arm.teacher_layers[0], list(_accuracies(runs, arm.name).values())
        mean, std = mean_std(accs)
        rows.append(dict(layer=layer, module=stats[layer].get("module"), student_layer=arm.student_layers[0],
                         **{c: float(stats[layer][c]) for c in CRITERIA}, top_k_Q=layer in top_q,
                         n=len(accs), acc_mean=mean, acc_std=std, arm=arm.name))
    table = pd.DataFrame(rows, columns=["layer", "module", "student_layer", *CRITERIA, "top_k_Q", "n", "acc_mean", "acc_std", "arm"])
    measured = table["n"] > 0
    table["rank_Q"] = table["Q"].where(measured).rank(ascending=False, method="min").astype("Int64")
    table["rank_acc"] = table["acc_mean"].where(measured).rank(ascending=False, method="min").astype("Int64")
    return table


def correlation_table(layers: pd.DataFrame, runs: pd.DataFrame, *, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Spearman's rho of each criterion with single-layer accuracy over the measured layers,
    with its bootstrap interval over seeds (`bootstrap_spearman`, the same `seed` for all)."""
    accs = [list(_accuracies(runs, arm).values()) for arm in layers["arm"]]
    rows = []
    for criterion in CRITERIA:
        ci = bootstrap_spearman(layers[criterion].to_numpy(float), accs, n_boot=n_boot, seed=seed)
        rows.append(dict(criterion=criterion, rho=ci.estimate, low=ci.low, high=ci.high, n_layers=ci.n, n_boot=n_boot))
    return pd.DataFrame(rows)


def control_table(plan: StudyPlan, runs: pd.DataFrame, kinds: Sequence[str] = (REFERENCE, CONTROL)) -> pd.DataFrame:
    """Per arm of `kinds` (default: the CE student and the multi-layer controls): accuracy, and
    ours minus it paired over seeds (`paired_difference`) with the sentence that states it. With
    kinds=(STUDENT,) the student-map arms, after `ours` (the baseline map, the same runs)."""
    ours = _accuracies(runs, "ours")
    arms = [a for a in plan.arms if a.kind in kinds]
    student = STUDENT in kinds
    if student:
        arms = [plan.arm("ours"), *arms]
    rows = []
    for arm in arms:
        accs = _accuracies(runs, arm.name)
        mean, std = mean_std(list(accs.values()))
        label = "the student's baseline list (ours)" if student and arm.name == "ours" else arm.label
        row = dict(arm=arm.name, label=label, teacher_layers=_fmt_layers(arm.teacher_layers),
                   student_layers=_fmt_layers(arm.student_layers), n=len(accs), acc_mean=mean, acc_std=std)
        if arm.name != "ours":
            diff = paired_difference(ours, accs)
            row.update(diff_mean=diff.estimate, diff_low=diff.low, diff_high=diff.high, n_pairs=diff.n,
                       sentence=difference_sentence(OURS_MAP_WORDS if student else OURS_WORDS, f"{arm.name} ({arm.label})", diff))
        rows.append(row)
    columns = ["arm", "label", "teacher_layers", "student_layers", "n", "acc_mean", "acc_std",
               "diff_mean", "diff_low", "diff_high", "n_pairs", "sentence"]
    return pd.DataFrame(rows, columns=columns)


def student_map_findings(maps: pd.DataFrame) -> list[str]:
    """Plain sentences on the student maps (the `control_table` of the STUDENT arms): each map
    that beat or lost to the baseline list with an interval excluding 0, then a count."""
    compared = maps[(maps["arm"] != "ours") & maps["diff_low"].notna()]
    if compared.empty:
        return ["Student-layer maps: no map has two or more seeds finished beside ours; nothing to compare yet."]
    out = []
    for row in compared.itertuples():
        if row.diff_high < 0:
            out.append(f"**Student map {row.arm} beat the baseline list**: {row.sentence}")
        elif row.diff_low > 0:
            out.append(f"Student map {row.arm} lost to the baseline list: {row.sentence}")
    won, lost = int((compared["diff_high"] < 0).sum()), int((compared["diff_low"] > 0).sum())
    out.append(f"Student-layer maps, with Q's teacher layers fixed: of {len(compared)} maps compared with the student's baseline "
               f"list, {won} beat it, {lost} lost to it, and {len(compared) - won - lost} differ by less than the "
               f"{LEVEL * 100:g} % interval can resolve.")
    return out


# ----------------------------------------------------------------------------- findings


def findings(layers: pd.DataFrame, correlations: pd.DataFrame, controls: pd.DataFrame, top_q: Sequence[int]) -> list[str]:
    """Plain sentences on where Q fails (bold) or holds, from the three tables."""
    out: list[str] = []
    measured = layers[layers["n"] > 0].sort_values(["acc_mean", "layer"], ascending=[False, True])
    n = len(measured)
    if n >= 2:
        first = measured.sort_values(["Q", "layer"], ascending=[False, True]).iloc[0]
        best = measured.iloc[0]
        rank = int(first["rank_acc"])
        where = f"layer {int(first['layer'])} ({first['acc_mean']:.2f} %)"
        top = f"best: layer {int(best['layer'])}, {best['acc_mean']:.2f} %"
        if rank == n:
            out.append(f"**Q fails**: it ranks {where} first of the {n} layers measured alone, and that layer transfers "
                       f"worst of them ({top}).")
        elif rank > 1:
            out.append(f"Q's first choice, {where}, ranks {rank} of {n} by single-layer accuracy ({top}).")
        else:
            out.append(f"Q's first choice, {where}, is also the best of the {n} layers measured alone.")
        out.append(_top_k_sentence(sorted(int(i) for i in top_q), [int(i) for i in measured["layer"]]))
    else:
        out.append(f"Only {n} layer(s) measured alone: too few to judge Q's ranking; run the single-layer sweep.")
    q = correlations.set_index("criterion").loc["Q"]
    ci = Interval(q["rho"], q["low"], q["high"], int(q["n_layers"]))
    rho = f"rho = {ci.estimate:+.2f} ({LEVEL * 100:g} % CI {ci.low:+.2f} to {ci.high:+.2f}, {ci.n} layers)"
    if math.isnan(ci.estimate) or not ci.defined:
        out.append("Spearman's rho of Q with single-layer accuracy is undefined (fewer than 3 layers measured, or all tied).")
    elif ci.high < 0:
        out.append(f"**Q orders the layers against their transfer value**: {rho}.")
    elif ci.low <= 0:
        out.append(f"**No evidence that Q orders layers by transfer value**: {rho}; the interval contains 0.")
    else:
        out.append(f"Q orders layers by transfer value: {rho}.")
    defined = correlations.dropna(subset=["rho"])
    if not defined.empty and not math.isnan(ci.estimate):
        top = defined.sort_values("rho", ascending=False).iloc[0]
        if top["criterion"] != "Q" and top["rho"] > ci.estimate:
            out.append(f"{top['criterion']} ranks the layers better than Q (rho {top['rho']:+.2f} vs {ci.estimate:+.2f}).")
    beaten = controls[(controls["arm"] != "ce") & (controls["diff_high"] < 0)]
    for _, row in beaten.iterrows():
        out.append(f"**{row['arm']} ({row['label']}) beat Q's layers**: {row['sentence']}")
    comparable = controls[(controls["arm"] != "ce") & controls["diff_low"].notna()]
    if beaten.empty and not comparable.empty:
        out.append(f"No control beat Q's layers with a {LEVEL * 100:g} % interval excluding 0; Q's layers beat "
                   f"{int((comparable['diff_low'] > 0).sum())} of the {len(comparable)} controls.")
    return out


def _top_k_sentence(top_q: list[int], by_accuracy: list[int]) -> str:
    """Q's top-k against the best single layers; `by_accuracy`: measured layers, best first."""
    k = len(top_q)
    measured_q = [i for i in top_q if i in by_accuracy]
    best = sorted(by_accuracy[: len(measured_q)])
    if len(measured_q) < k:
        prefix = f"Only {measured_q or 'none'} of Q's top-{k} {top_q} were measured alone"
        if not measured_q:
            return prefix + "; run their single-layer arms to compare."
        same = set(measured_q) == set(best)
        return (f"{prefix}; {'they are' if same else '**they are not**'} the best {len(best)} of the {len(by_accuracy)} "
                f"layers measured ({best}).")
    if set(top_q) == set(best):
        return f"Q's top-{k} {top_q} are the {k} best single layers."
    return (f"**Q's top-{k} are not the {k} best single layers**: Q picks {top_q}, the best single layers are {best} "
            f"({len(set(top_q) & set(best))} in common).")


def mismatches(runs: pd.DataFrame) -> list[str]:
    """Finished runs whose recorded layers differ from the plan (an older stage 2 that sorts an
    explicit teacher list turns the reversed control into Q's own pairing)."""
    done = runs[runs["status"] == "finished"]
    bad = done[(done["recorded_teacher_layers"] != done["teacher_layers"]) | (done["recorded_student_layers"] != done["student_layers"])]
    return [f"{r.arm} seed {r.seed}: planned teacher layers [{r.teacher_layers}] -> student [{r.student_layers}], stage 2 "
            f"ran [{r.recorded_teacher_layers}] -> [{r.recorded_student_layers}]" for r in bad.itertuples()]


# ----------------------------------------------------------------------------- entry points


def default_out(cfg: Config) -> Path:
    if multi.is_multi(cfg):  # several teachers: the multi-teacher arms (common/study/multi.py)
        return study_multi.default_out(cfg)
    cfg = multi.single_config(cfg)
    return Path(cfg.artifacts) / "reports" / "layer_study" / cfg.dataset.name / dir_name(pair_name(cfg.teacher.name, cfg.student.name))


def run(cfg: Config, out_dir: Path | None = None, *, data: Any = None, n_boot: int = N_BOOTSTRAP, boot_seed: int = 0,
        **plan_options: Any) -> dict[str, Any]:
    """The study report for one config (the one `make study` ran with): finds each arm's runs,
    writes layer_study.{csv,md}, layer_study_{controls,correlations,student_maps,runs}.csv and two plots under
    `out_dir` (default `default_out`). plan_options: `layers`, `random_draws`, `random_seed`,
    as given to the plan. Nothing is trained or profiled here."""
    from common.data.registry import load_data

    if multi.is_multi(cfg):  # several teachers: the multi-teacher arms' report instead
        return study_multi.run(cfg, out_dir, data=data)
    cfg = multi.single_config(cfg)  # one listed teacher is `teacher`
    data = data if data is not None else load_data(cfg.dataset)
    plan, manifest = plan_for(cfg, data, **plan_options)
    runs = collect_runs(cfg, data, plan, manifest)
    layers = layer_results(plan, manifest, runs)
    correlations = correlation_table(layers, runs, n_boot=n_boot, seed=boot_seed)
    controls = control_table(plan, runs)
    maps = control_table(plan, runs, (STUDENT,))
    found = findings(layers, correlations, controls, list(manifest.data["top_k"]["Q"])) + student_map_findings(maps)
    pair = pair_name(cfg.teacher.name, cfg.student.name)
    teacher = run_summary(read_metrics(teacher_dir(cfg, data)))["best_test_acc"]
    ce = list(_accuracies(runs, "ce").values())
    headroom = headroom_sentence(pair, teacher, *mean_std(ce), len(ce)) if not math.isnan(teacher) \
        else "The teacher has no finished metrics.csv: the headroom is unknown."
    off = mismatches(runs)
    notes = list(plan.notes) + ([f"{len(off)} finished runs ran other layers than planned (the arm's numbers mix "
                                 "two settings): " + "; ".join(off)] if off else [])
    title = f"Layer-selection study: {cfg.teacher.name} → {cfg.student.name} on {cfg.dataset.name} (seeds {', '.join(map(str, cfg.seeds))})"
    markdown = study_markdown(title, headroom, plan, layers, correlations, controls, found, runs, notes, maps)
    out_dir = Path(out_dir) if out_dir is not None else default_out(cfg)
    tables = {"layer_study.csv": layers, "layer_study_controls.csv": controls, "layer_study_correlations.csv": correlations,
              "layer_study_student_maps.csv": maps, "layer_study_runs.csv": runs}
    files = write_files(out_dir, tables, markdown)
    stem = f"layer_study_{safe_filename(cfg.dataset.name)}_{safe_filename(pair)}"
    plots = [plot_criteria(layers, out_dir / "plots" / f"{stem}_criteria.png", title),
             plot_controls(controls, out_dir / "plots" / f"{stem}_controls.png", title)]
    return dict(plan=plan, runs=runs, layers=layers, correlations=correlations, controls=controls, student_maps=maps, findings=found,
                markdown=markdown, files=files, plots=plots)


def write_files(out_dir: Path, tables: dict[str, pd.DataFrame], markdown: str) -> dict[str, Path]:
    """The CSVs and layer_study.md, each written atomically; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / name for name in [*tables, "layer_study.md"]}
    for name, frame in tables.items():
        atomic_write(files[name], lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    atomic_write_text(files["layer_study.md"], markdown)
    return files


def parse_layers(text: str | None) -> list[int] | None:
    """--layers "3 5 7" or "3,5,7" (as --seeds); None when not given."""
    from common.errors import UserError

    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--layers takes teacher layer indices, got {text!r}; e.g. --layers \"3 7 11\"") from None


def add_plan_flags(p: Any) -> None:
    """The plan's options, shared by `python -m common.study plan` and `stage3_evaluate.py --study`."""
    p.add_argument("--layers", default=None, help='only these teacher layers in the single-layer sweep, e.g. --layers "3 7 11" (default: all)')
    p.add_argument("--random-draws", type=int, default=RANDOM_DRAWS, help=f"random k-layer controls (default {RANDOM_DRAWS})")
    p.add_argument("--random-seed", type=int, default=RANDOM_SEED, help=f"seed of the random controls (default {RANDOM_SEED})")
    p.add_argument("--student-draws", type=int, default=RANDOM_DRAWS,
                   help=f"random student-layer lists beside ours' teacher layers (default {RANDOM_DRAWS}; 0: none)")


def plan_options(args: Any) -> dict[str, Any]:
    return dict(layers=parse_layers(args.layers), random_draws=args.random_draws, random_seed=args.random_seed,
                student_draws=args.student_draws)


def main() -> int:
    """`python -m common.study plan [stage-2 flags and overrides]`: the arms, `name<TAB>overrides`."""
    from common import cli
    from common.checks import load_data_checked
    from common.errors import UserError

    p = cli.parser(main.__doc__)
    p.prog = "python -m common.study plan"
    p.add_argument("--student", default=None, help="student model name (sets student.name)")
    p.add_argument("--seeds", default=None, help="accepted so that the stage-2 flags can be passed as they are")
    add_plan_flags(p)
    argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        p.print_help()
        return 0
    if argv[:1] != ["plan"]:
        raise UserError("usage: python -m common.study plan [--config ...] [stage-2 flags] [key=value ...]; see --help")
    args = p.parse_intermixed_args(argv[1:])
    cfg = cli.build_config(args, {"student": "student.name"})
    if multi.is_multi(cfg):  # several teachers: the multi-teacher arms, stage 1 first when missing
        lines = study_multi.plan_lines(cfg)  # the config's checks first
        multi.manifest_for(cfg, load_data_checked(multi.config_of(cfg, multi.teacher_configs(cfg)[0])))
        print("\n".join(lines))
        return 0
    cfg = multi.single_config(cfg)  # one listed teacher is `teacher`
    data = load_data_checked(cfg)
    plan, _ = plan_for(cfg, data, build_profile=True, **plan_options(args))  # stage 1 first when missing, as stage 2
    print("\n".join(plan_lines(plan)))
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
