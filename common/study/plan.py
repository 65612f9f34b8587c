"""The layer-selection study's plan (issue 10): which stage-2 runs answer "does Q pick the right
teacher layers?", each as a named arm with its exact `key=value` overrides.

One pure function, `study_plan`, turns stage 1's manifest (S, I, E, Q of every teacher layer and
the top-k by every criterion, METHOD 6-7) and the student's layer count into the arms. The shell
loop of `make study` (through `python -m common.study plan`) and the study report both call it,
so the report looks for exactly the runs the loop started; neither selects layers itself.

Arms, all logit-free (the `ours` preset: CE on the detached head only, METHOD 9):

* reference `ce`: the CE-only student (the headroom, and what distillation adds at all);
* single layers `layer_<i>`: teacher layer i alone, paired with the student layer at the nearest
  relative depth (`nearest_student_layer`), for every layer whose S, I, E and Q are defined;
* controls beside `ours` (top-k by Q): `ours_s`, `ours_i`, `ours_e`, `ours_sqrtie` (top-k by S,
  I, E, sqrt(I*E)), `stl_seplin` (the teacher's baseline list), `reversed_q` (Q's top-k in
  reverse depth order, paired one-to-one with the student baseline list: deepest teacher layer
  to the shallowest student layer), `bottom_q` (the k defined layers of lowest Q) and
  `random_<d>` (seeded draws of k distinct defined layers, sorted; each list differs from Q's,
  bottom_q's and the earlier draws', so no two arms share runs).

Every multi-layer arm above pairs its k teacher layers with the student's baseline list, as `ours`.

Student-map arms (kind STUDENT): Q's top-k teacher layers fixed, as `ours`, and the student layers
varied (common/layers/pairing.py, the one pairing rule): `ours` itself is the `baseline` map (the
same runs); `student_depth` (each teacher layer to the student layer at the nearest relative
depth, distinct, depth order kept), `student_q` (the student's own top-k by Q, from the profile
of seed 0's `ce` run, common/profile/student.py; its layers are known once that run is profiled,
so the plan lists them only when the profile exists) and `student_random_<d>` (seeded draws of k
distinct student layers, sorted, so depth order is kept; each differs from the baseline and
depth lists and the earlier draws).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from common.config import Config, MethodConfig, apply_override, from_dict, to_dict, validate_config
from common.errors import ConfigError, DataError
from common.layers.pairing import depth_student_layers, in_depth_order, nearest_student_layer, random_layer_lists, relative_depth

REFERENCE, CONTROL, SINGLE, STUDENT = "reference", "control", "single", "student_map"
CRITERION_PRESETS = {"S": "ours_s", "I": "ours_i", "E": "ours_e", "sqrtIE": "ours_sqrtie"}  # METHOD 9 "Ours-*"
DEFINED_BY = ("S", "I", "E", "Q")  # a layer enters the study only when all four are finite
RANDOM_DRAWS = 3
RANDOM_SEED = 0


@dataclass(frozen=True)
class Arm:
    """One stage-2 run (per seed) of the study.

    teacher_layers / student_layers: the pairing the arm asks for, in pairing order (what
    stage 2 records as run.teacher_layers / run.student_layers); () for the CE student, and
    student_layers () for `student_q` until the CE student is profiled.
    """

    name: str
    kind: str  # REFERENCE | CONTROL | SINGLE | STUDENT
    label: str  # what the arm is, in words
    overrides: tuple[str, ...]
    teacher_layers: tuple[int, ...] = ()
    student_layers: tuple[int, ...] = ()

    @property
    def command(self) -> str:
        """The overrides as one shell word list (no spaces inside an override)."""
        return " ".join(self.overrides)


@dataclass(frozen=True)
class StudyPlan:
    arms: tuple[Arm, ...]
    k: int
    defined_layers: tuple[int, ...]  # teacher layers with finite S, I, E, Q
    notes: tuple[str, ...] = field(default=())  # arms left out, and why

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def of_kind(self, kind: str) -> list[Arm]:
        return [a for a in self.arms if a.kind == kind]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _list(layers: Sequence[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in layers) + "]"


def study_plan(
    manifest: Any,
    n_student: int,
    student_baseline: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    random_draws: int = RANDOM_DRAWS,
    random_seed: int = RANDOM_SEED,
    student_draws: int = RANDOM_DRAWS,
    student_top_q: Sequence[int] | None = None,
) -> StudyPlan:
    """The study's arms from stage 1's manifest (a `common.profile.manifest.Manifest` or its `.data`).

    n_student: the student's generalized-layer count; student_baseline: its baseline list (the
    student layers of every multi-layer arm). layers: only these teacher layers in the single-
    layer sweep (default all). random_draws / random_seed: the random controls, drawn with
    `_random_lists`. student_draws: the random student lists (0: none; the same random_seed);
    student_top_q: the CE student's top-k by Q (`common.profile.student.StudentProfile.top_q`),
    None before it is profiled.
    """
    data = getattr(manifest, "data", manifest)
    table = data["layers"]
    n_teacher = len(table)
    defined = tuple(int(row["index"]) for row in table if all(_finite(row.get(c)) for c in DEFINED_BY))
    top_k = data["top_k"]
    k = int(top_k["k"])
    top_q = top_k.get("Q")
    if top_q is None or len(defined) < k:
        raise DataError(f"the profile has only {len(defined)} teacher layers with finite S, I, E and Q, fewer than k={k}; "
                        "the study needs Q's top-k (lower profile.k)")
    baseline = tuple(int(j) for j in student_baseline)
    if len(baseline) != k:
        raise ConfigError(f"profile.k={k} but the student's baseline list {list(baseline)} has {len(baseline)} layers; "
                          f"ours pairs them one-to-one, so set profile.k={len(baseline)}")
    if random_draws < 1:
        raise ConfigError(f"--random-draws must be >= 1 (the study's default is {RANDOM_DRAWS}), got {random_draws}")
    if student_draws < 0:
        raise ConfigError(f"--student-draws must be >= 0 (the study's default is {RANDOM_DRAWS}), got {student_draws}")
    notes: list[str] = []
    arms = [Arm("ce", REFERENCE, "CE-only student (no teacher)", ("method.name=ce",))]
    arms += _controls(data, k, tuple(top_q), defined, baseline, random_draws, random_seed, notes)
    arms += _single_layers(n_teacher, n_student, defined, layers, notes)
    arms += _student_maps(next(a for a in arms if a.name == "ours"), n_teacher, n_student, student_top_q, student_draws, random_seed, notes)
    return StudyPlan(tuple(arms), k, defined, tuple(notes))


def _controls(data: Mapping[str, Any], k: int, top_q: tuple[int, ...], defined: tuple[int, ...], baseline: tuple[int, ...],
              random_draws: int, random_seed: int, notes: list[str]) -> list[Arm]:
    """ours and the multi-layer controls; what is left out, and why, goes to `notes`."""
    # ours: the profile's own selection when it is top-k by Q (then `make distill METHOD=ours`
    # runs are the same runs), else Q's top-k named by its word.
    selection = data.get("selection") or {}
    by_q = selection.get("criterion") == "Q" and selection.get("how") != "explicit"
    arms = [Arm("ours", CONTROL, f"top-{k} by Q", ("method.name=ours",) if by_q else ("method.name=ours", "method.teacher_layers=Q"),
                top_q, baseline)]
    for criterion, preset in CRITERION_PRESETS.items():
        chosen = data["top_k"].get(criterion)
        if chosen is None:
            notes.append(f"{preset} left out: fewer than k={k} layers have a finite {criterion}")
            continue
        arms.append(Arm(preset, CONTROL, f"top-{k} by {criterion}", (f"method.name={preset}",), tuple(chosen), baseline))
    teacher_baseline = tuple(int(i) for i in data["baseline_layers"])
    arms.append(Arm("stl_seplin", CONTROL, "teacher's baseline list", ("method.name=stl_seplin",), teacher_baseline, baseline))

    def explicit(name: str, label: str, chosen: Sequence[int]) -> Arm:
        return Arm(name, CONTROL, label, ("method.name=ours", f"method.teacher_layers={_list(chosen)}"), tuple(chosen), baseline)

    if k > 1:
        arms.append(explicit("reversed_q", f"top-{k} by Q in reverse depth order", sorted(top_q, reverse=True)))
    else:
        notes.append("reversed_q left out: k=1, reversing one layer changes nothing")
    if len(defined) > k:
        q = {int(row["index"]): float(row["Q"]) for row in data["layers"]}
        bottom = sorted(sorted(defined, key=lambda i: (q[i], i))[:k])
        arms.append(explicit("bottom_q", f"bottom-{k} by Q", bottom))
        for d, drawn in enumerate(_random_lists(defined, k, {tuple(sorted(top_q)), tuple(bottom)}, random_draws, random_seed, notes), 1):
            arms.append(explicit(f"random_{d}", f"random draw {d} of {k} layers, seed {random_seed}", drawn))
    else:
        notes.append(f"bottom_q and random_* left out: only {len(defined)} defined layers, so every k-list is Q's")
    same = [a.name for a in arms if a.name != "ours" and a.teacher_layers == top_q]
    if same:
        notes.append(f"{', '.join(same)}: the same teacher layers as ours {list(top_q)}, so the difference to ours is "
                     "run-to-run noise only (0 where training is deterministic)")
    return arms


def _random_lists(defined: tuple[int, ...], k: int, taken: set[tuple[int, ...]], draws: int, seed: int,
                  notes: list[str]) -> list[tuple[int, ...]]:
    """The random teacher lists (`common.layers.pairing.random_layer_lists` over the defined
    layers); a note when fewer than `draws` lists are left."""
    out = random_layer_lists(defined, k, taken, draws, seed)
    if len(out) < draws:
        notes.append(f"random_{len(out) + 1} and later left out: every {k}-list of the {len(defined)} defined layers is taken")
    return out


def _single_layers(n_teacher: int, n_student: int, defined: tuple[int, ...], layers: Sequence[int] | None,
                   notes: list[str]) -> list[Arm]:
    """layer_<i>: teacher layer i alone, to the student layer at the nearest relative depth."""
    from common.layers.hooks import resolve_layers  # imports torch: not at import time, stage 3 starts without it

    wanted = range(n_teacher) if layers is None else resolve_layers(layers, n_teacher, "--layers entry")
    width = len(str(n_teacher - 1))
    arms = []
    for i in sorted(set(wanted)):
        if i not in defined:
            notes.append(f"layer_{i:0{width}d} left out: S, I, E or Q is undefined there (zero or non-finite features)")
            continue
        j = nearest_student_layer(i, n_teacher, n_student)
        arms.append(Arm(f"layer_{i:0{width}d}", SINGLE, f"teacher layer {i} alone -> student layer {j}",
                        ("method.name=ours", f"method.teacher_layers=[{i}]", f"method.student_layers=[{j}]"), (i,), (j,)))
    return arms


def _student_maps(ours: Arm, n_teacher: int, n_student: int, student_top_q: Sequence[int] | None, draws: int, seed: int,
                  notes: list[str]) -> list[Arm]:
    """student_depth, student_q, student_random_<d>: ours' teacher layers and overrides, other student layers."""
    top_q, baseline, k = ours.teacher_layers, ours.student_layers, len(ours.teacher_layers)
    if n_student < k:
        notes.append(f"student-map arms left out: the student has {n_student} generalized layers, fewer than k={k}")
        return []
    depths = [relative_depth(i, n_teacher) for i in top_q]
    depth = tuple(depth_student_layers(depths, range(n_student), n_student))
    student_q = tuple(in_depth_order(depths, student_top_q)) if student_top_q is not None else ()

    def mapped(name: str, label: str, value: str, layers: tuple[int, ...]) -> Arm:
        return Arm(name, STUDENT, label, (*ours.overrides, f"method.student_layers={value}"), top_q, layers)

    arms = [mapped("student_depth", "student layers at the teacher layers' relative depth", "depth", depth),
            mapped("student_q", "the student's own top-k by Q (seed 0's CE student)", "Q", student_q)]
    if student_top_q is None:
        notes.append("student_q: its student layers are known once seed 0's ce run is profiled (stage 2 does it before the arm's first run)")
    drawn = random_layer_lists(range(n_student), k, {tuple(sorted(baseline)), tuple(sorted(depth))}, draws, seed)
    if len(drawn) < draws:
        notes.append(f"student_random_{len(drawn) + 1} and later left out: every {k}-list of the {n_student} student layers is taken")
    for d, drawn_layers in enumerate(drawn, 1):
        layers = tuple(in_depth_order(depths, drawn_layers))  # Q's top-k is sorted, so this is the sorted draw
        arms.append(mapped(f"student_random_{d}", f"random student draw {d} of {k} layers, seed {seed}", _list(layers), layers))
    as_ours = [a.name for a in arms if a.student_layers and a.student_layers == baseline]
    if as_ours:
        notes.append(f"{', '.join(as_ours)}: the student's baseline list {list(baseline)}, as ours (separate runs with the same "
                     "settings), so the difference to ours is run-to-run noise only")
    for i, a in enumerate(arms):
        shared = [b.name for b in arms[i + 1:] if a.student_layers and b.student_layers == a.student_layers]
        if shared:  # a map and a draw that resolve to one list hash to one run directory
            notes.append(f"{a.name} and {', '.join(shared)}: the same student layers {list(a.student_layers)}, so the same runs")
    return arms


# ----------------------------------------------------------------------------- config side


def check_base_config(cfg: Config) -> None:
    """The study sets each arm's method; a method field set in the config or overrides (other
    than its name, which every arm sets) would leak into every arm, so it is refused."""
    set_fields = [f.name for f in dataclasses.fields(MethodConfig) if f.name != "name" and getattr(cfg.method, f.name) is not None]
    if set_fields:
        raise ConfigError(f"the study chooses each arm's method and layers; remove method.{', method.'.join(set_fields)} "
                          "from the config and overrides")


def arm_config(cfg: Config, arm: Arm) -> Config:
    """`cfg` with the arm's overrides applied, as `stage2_distill.py ... <overrides>` builds it."""
    data = to_dict(cfg)
    for item in arm.overrides:
        apply_override(data, item)
    out = from_dict(Config, data)
    validate_config(out)
    return out


def plan_for(cfg: Config, data: Any, *, build_profile: bool = False, **options: Any) -> tuple[StudyPlan, Any]:
    """(plan, manifest) for a resolved config: the manifest stage 1 wrote (`build_profile`: run
    stage 1 first when it is missing, as stage 2 does), the student's layer count and baseline
    list, and the CE student's profile when it exists (never built here: its `ce` run may not be
    trained yet). `options` go to `study_plan`."""
    from common.layers.tables import layer_infos_for
    from common.models import MODELS
    from common.profile import student
    from common.profile.runner import manifest_for
    from common.profile.manifest import load_manifest

    check_base_config(cfg)
    manifest = manifest_for(cfg, data) if build_profile else load_manifest(cfg, data)
    if manifest is None:
        raise DataError(f"no finished profile for this config under {cfg.artifacts}; run the study first (make study) "
                        "or stage 1 with the same settings")
    n_student = len(layer_infos_for(cfg.student, data))
    profiled = student.load(cfg, data)  # of cfg's `ce` run: the method is replaced by ce there
    plan = study_plan(manifest, n_student, MODELS.get(cfg.student.name).baseline_layers,
                      student_top_q=profiled.top_q if profiled is not None else None, **options)
    return plan, manifest


def arm_run_dirs(cfg: Config, data: Any, arm: Arm, seeds: Sequence[int], manifest: Any) -> dict[int, Any]:
    """Seed -> the run directory stage 2 gives this arm: the same steps as `common.distill.run`
    (resolve the method, check the pairing, read a layer word from the manifest, hash), without
    building anything. {} for `student_q` before its CE student is profiled (no run can exist)."""
    from common import distill
    from common.methods import resolve_run_method

    arm_cfg = arm_config(cfg, arm)
    spec = resolve_run_method(arm_cfg)
    if not spec.needs_teacher:
        return distill.run_dirs(arm_cfg, data, spec, [], [int(s) for s in seeds])
    profiled = None
    if spec.student_layers == "Q":
        from common.profile import student

        profiled = student.load(arm_cfg, data)
        if profiled is None:
            return {}
    teacher_layers, student_layers = distill.resolve_layer_lists(arm_cfg, spec, data, manifest, student=profiled)
    return distill.run_dirs(arm_cfg, data, spec, teacher_layers, [int(s) for s in seeds], student_layers)


def plan_lines(plan: StudyPlan) -> list[str]:
    """`name<TAB>overrides`, one arm a line, for the shell loop of `make study`."""
    return [f"{arm.name}\t{arm.command}" for arm in plan.arms]
