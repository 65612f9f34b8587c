"""Stage 2: distil a student from the teacher, once per seed (METHOD 7, 8; section 0 items 4, 6, 7, 9).

For each seed a run directory (keyed by a hash of the resolved config, see common/artifacts/layout.py)
gets config.yaml, metrics.csv, student.pt and, written last, `done`. Finished runs are skipped,
interrupted ones resumed from their checkpoint, failed ones marked with a `failed` file.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common.train import multi_teacher
from common.artifacts import layout as artifacts
from common.train import distributed
from common.cache.reader import FeatureCache
from common.checks import load_data_checked
from common.config import Config, TrainConfig, to_dict
from common.data.registry import Data
from common.train.distributed import SINGLE, Ranks
from common.errors import ConfigError
from common.runtime import ram_budget, versions
from common.layers import pairing
from common.layers.hooks import resolve_layers
from common.method_spec import MethodSpec, hashed_fields
from common.methods import build_distiller, resolve_run_method
from common.models import MODELS, create_model
from common.profile import multi, runner as profile
from common.layers.tables import DataShape, layer_shapes, layer_infos_for
from common.profile.features import ensure_features, rebuild_hint, wants_cache
from common.profile import student as student_profile
from common.profile.manifest import Manifest
from common.profile.teacher import ensure_teacher, load_teacher
from common.train.inputs import rows_nbytes
from common.train.teacher_source import CachedTeacher, LiveTeacher
from common.runtime import resolve_device, seed_everything
from common.train.loop import CHECKPOINT, FitResult, TeacherSource, finish, fit

log = logging.getLogger("kd")


@dataclass
class RunResult:
    seed: int
    dir: Path
    skipped: bool
    best_test_acc: float | None = None


def resolve_layer_lists(
    cfg: Config, spec: MethodSpec, data: Data, manifest: Manifest | None = None, student: student_profile.StudentProfile | None = None,
) -> tuple[list[int], list[int]]:
    """Teacher and student layer lists of a feature method (METHOD 7; section 0 item 4).

    Explicit lists and the pairing are checked before anything is trained (`check_layer_lists`). A
    teacher-layer word other than "baseline" ("selected", a criterion) is read from stage 1's
    manifest through `Manifest.teacher_layers` (`manifest`, or stage 1's for `cfg`, run first when
    the profile is missing): stage 2 never selects layers itself. A student map ("depth", "Q") is
    turned into student layers by common/layers/pairing.py, the one home of the pairing rule; "Q"
    reads the CE student's profile (`student`, or common/profile/student.py's for `cfg`, built
    first when missing).
    """
    teacher_layers, student_layers = check_layer_lists(cfg, spec, data)
    if isinstance(teacher_layers, str):
        teacher_layers = (manifest or profile.manifest_for(cfg, data)).teacher_layers(teacher_layers)
    if isinstance(student_layers, str):
        top_q = (student or student_profile.manifest_for(cfg, data)).top_q if student_layers == "Q" else None
        student_layers = map_student_layers(cfg, data, student_layers, teacher_layers, top_q)
    return teacher_layers, student_layers


def map_student_layers(cfg: Config, data: Data, word: str, teacher_layers: list[int], student_top_q: list[int] | None) -> list[int]:
    """The student layers of map `word` ("depth" or "Q") for these resolved teacher layers, by
    common/layers/pairing.py: relative depths within the teacher, the student's own layers."""
    n_teacher = len(layer_infos_for(cfg.teacher, data))
    n_student = len(layer_infos_for(cfg.student, data))
    depths = [pairing.relative_depth(i, n_teacher) for i in teacher_layers]
    if word == "depth":
        return pairing.depth_student_layers(depths, range(n_student), n_student)
    if student_top_q is None or len(student_top_q) != len(teacher_layers):
        raise ConfigError(f"method.student_layers=Q pairs the student's top-{cfg.profile.k} by Q (profile.k) with the teacher's "
                          f"{len(teacher_layers)} layers {teacher_layers}; give as many teacher layers as profile.k")
    return pairing.in_depth_order(depths, student_top_q)


def run_dirs(cfg: Config, data: Data, spec: MethodSpec, teacher_layers: list[int], seeds: list[int],
             student_layers: list[int] | None = None) -> dict[int, Path]:
    """Seed -> the run directory of `spec` with these resolved teacher layers (common/artifacts/layout.py).

    A student map ("depth", "Q") enters the key as the student layers it resolved to, written as
    an explicit list would be: a run depends on the layers it distils into, not on how they were
    chosen (as on the teacher side). "baseline" and explicit lists hash as they always did."""
    use = artifacts.teacher_use(teacher_layers, cfg.profile.cache_dtype) if spec.needs_teacher else None
    method = hashed_fields(spec)
    if spec.student_layers in pairing.MAPPED:
        if student_layers is None:
            raise ValueError(f"method.student_layers={spec.student_layers} needs the resolved student layers for the run key")
        method["student_layers"] = tuple(student_layers)
    return {s: artifacts.run_dir(cfg, data, method, use, s) for s in seeds}


def check_layer_lists(cfg: Config, spec: MethodSpec, data: DataShape) -> tuple[list[int] | str, list[int] | str]:
    """The layer lists of `resolve_layer_lists`, checked without reading or building the profile:
    indices in range and listed once, as many teacher as student layers for a one-to-one mapping,
    enough student layers for a student map, and for "Q" a CE student to profile.
    Explicit lists keep the order given: one-to-one pairs the i-th teacher layer with the i-th
    student layer, so [15, 14, 13, 12] against [1, 3, 5, 7] is the reversed map.

    Returns the teacher layers (indices, or the profile word to read from the manifest) and the
    student layers (indices, or the map word "depth" / "Q" to resolve against the teacher layers).
    """
    if not (spec.needs_teacher_features or spec.needs_teacher_model):
        return [], []
    n_teacher = len(layer_infos_for(cfg.teacher, data))
    n_student = len(layer_infos_for(cfg.student, data))
    mapped = spec.student_layers in pairing.MAPPED
    if spec.student_layers == "baseline":
        student_layers: list[int] | str = list(MODELS.get(cfg.student.name).baseline_layers)
    elif mapped:
        student_layers = str(spec.student_layers)
    else:
        student_layers = resolve_layers(spec.student_layers, n_student, "student layer")
        _once("method.student_layers", spec.student_layers, student_layers)
    from_profile = spec.reads_profile
    teacher_layers: list[int] = []
    if spec.teacher_layers == "baseline":
        teacher_layers = list(MODELS.get(cfg.teacher.name).baseline_layers)
    elif not from_profile:
        teacher_layers = resolve_layers(spec.teacher_layers, n_teacher, "teacher layer")
        _once("method.teacher_layers", spec.teacher_layers, teacher_layers)
    if from_profile:
        profile.validate(cfg, n_teacher)
        explicit = spec.teacher_layers == "selected" and cfg.profile.layers
        n_pairs = len(cfg.profile.layers) if explicit else cfg.profile.k
        shown = f"profile.layers {cfg.profile.layers}" if explicit else f"the top-{cfg.profile.k} by {cfg.profile.criterion if spec.teacher_layers == 'selected' else spec.teacher_layers}"
    else:
        n_pairs, shown = len(teacher_layers), str(teacher_layers)
    if mapped:
        n_mapped = cfg.profile.k if spec.student_layers == "Q" else n_pairs
        if n_student < n_mapped:
            raise ConfigError(
                f"method.student_layers={spec.student_layers} needs {n_mapped} distinct student layers (for {shown}) but student "
                f"{cfg.student.name} has only {n_student} generalized layers; lower profile.k or give method.student_layers=[...]"
            )
        if spec.student_layers == "Q" and n_pairs != n_mapped:
            raise ConfigError(
                f"method.student_layers=Q pairs the student's top-{n_mapped} by Q (profile.k) with teacher layers {shown}; "
                "give as many teacher layers as profile.k"
            )
        if spec.student_layers == "Q" and isinstance(data, Data):  # the ce run's key needs the data, not only its shape
            student_profile.check_available(cfg, data)
    elif spec.mapping == "one2one" and n_pairs != len(student_layers):
        raise ConfigError(
            f"method {spec.name} pairs teacher layers {shown} one-to-one with student layers {student_layers}; "
            f"give as many of each (profile.k or method.student_layers=[...])"
        )
    return (str(spec.teacher_layers) if from_profile else teacher_layers), student_layers


def _once(key: str, given: object, resolved: list[int]) -> None:
    """A layer named twice (also as i and i - n) would be distilled twice; refuse it."""
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{key}={list(given)} names a layer twice; list each layer once")


def run(cfg: Config, seeds: list[int] | None = None, restart: bool = False, data: Data | None = None, ranks: Ranks = SINGLE) -> list[RunResult]:
    """Train one student per seed (skipping finished runs); returns what happened per seed.

    Unfinished runs resume from their checkpoint unless `restart`, which starts them over. The
    whole config is checked first (common.checks, then the layer pairing in `resolve_layer_lists`),
    before a teacher or profile is built or a directory is made.

    Under torchrun (`ranks`, see common/train/distributed.py) every rank calls this: the teacher and
    profile are built once under their file locks (the other ranks wait there), rank 0 takes
    each run's lock and decides skip / restart for all, every rank trains its shard, rank 0 writes.
    """
    # Several teachers: their own module (common/train/multi_teacher.py); one listed teacher is `teacher`.
    if multi.is_multi(cfg):
        return multi_teacher.run(cfg, seeds, restart, data, ranks)
    cfg = multi.single_config(cfg)
    seeds = list(seeds if seeds is not None else cfg.seeds)
    # the method first: a run that reads no teacher (ce) or no profile (kd) is not refused over their settings
    method = resolve_run_method(cfg)
    # the layer lists need only the dataset's shape: checked before its files are read where that is known
    layers_first = (lambda shape: check_layer_lists(cfg, method, shape)) if method.needs_teacher else None
    data = load_data_checked(cfg, data, needs_teacher=method.needs_teacher, reads_profile=method.reads_profile, before_data=layers_first)
    distributed.local_batch_size(cfg.train.batch_size, ranks)  # a batch that does not split is a config error, checked first
    device = distributed.device_for(ranks, resolve_device(cfg.train.device))
    distributed.init(ranks, device)
    spec = method
    needs_teacher = spec.needs_teacher
    teacher_layers: list[int] = []
    student_layers: list[int] = []
    if needs_teacher:
        teacher_layers, student_layers = resolve_layer_lists(cfg, spec, data)  # checks lists before training
    dirs = run_dirs(cfg, data, spec, teacher_layers, seeds, student_layers)
    todo = distributed.broadcast([s for s in seeds if not (dirs[s] / artifacts.DONE).exists()], ranks)  # one list for all ranks
    for s in sorted(set(seeds) - set(todo)):
        log.info("distill %s seed %d: finished, skipping (%s)", spec.name, s, dirs[s])
    results = [RunResult(s, dirs[s], True) for s in seeds if s not in todo]
    if not todo:
        return results

    teacher_shapes: dict[int, tuple[int, ...]] = {}
    if needs_teacher:
        ensure_teacher(cfg, data)
        all_shapes = layer_shapes(cfg, data)
        teacher_shapes = {i: all_shapes[i] for i in teacher_layers}
        if teacher_layers or student_layers:  # kd, dkd: no layer pairs, nothing to say
            log.info("distill %s: teacher layers %s -> student layers %s", spec.name, teacher_layers, student_layers)

    source = _teacher_source(cfg, data, spec, teacher_layers, device, ranks) if needs_teacher else None
    teacher_model = load_teacher(cfg, data, device)[0] if spec.needs_teacher_model else None
    for seed in todo:
        rdir = dirs[seed]
        with artifacts.locked(rdir, holder=ranks.is_main):
            if distributed.broadcast((rdir / artifacts.DONE).exists(), ranks):  # another process finished it while we waited
                results.append(RunResult(seed, rdir, True))
                continue
            if restart and ranks.is_main and (rdir / CHECKPOINT).exists():
                log.info("distill %s seed %d: --restart, discarding the checkpoint in %s", spec.name, seed, rdir)
                (rdir / CHECKPOINT).unlink()
            distributed.barrier(ranks)  # no rank reads a checkpoint that --restart is removing
            result = _train_one(cfg, data, spec, seed, rdir, teacher_layers, student_layers, teacher_shapes, source, teacher_model, ranks)
            results.append(result)
            # Rank 0 writes the run's last files while the others are done with it: everyone
            # waits here, so no rank leaves the process group while another still uses it.
            distributed.barrier(ranks)
    return sorted(results, key=lambda r: r.seed)


def _teacher_source(cfg: Config, data: Data, spec: MethodSpec, layers: list[int], device: torch.device, ranks: Ranks = SINGLE) -> TeacherSource:
    source = "cache" if wants_cache(cfg, data) else "live"
    logits = spec.needs_teacher_logits
    if source == "live":
        teacher, _ = load_teacher(cfg, data, device)
        return LiveTeacher(teacher, layers, logits)
    # source is "cache": config.validate_config refused a cache with augmentation (stale features).
    # ensure_features refuses a cache of another checkpoint or other data (stage 1 rebuilds it).
    rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
    cache = FeatureCache(ensure_features(cfg, data, layers, rows), rebuild_hint=rebuild_hint(cfg))
    # Under torchrun a rank holds only its shard's rows, and shares the memory with the others on its node.
    # On the device, the features share one budget with the images, which the loop places later
    # (common/train/inputs.py): their bytes are counted first.
    shard = distributed.shard(rows, ranks)
    return CachedTeacher(
        cache, layers, logits, device, ram_budget() // ranks.local_world, rows=shard,
        input_path=cfg.train.input_path, image_bytes=rows_nbytes(data.train.images, shard.numel()),
    )


def _train_one(
    cfg: Config,
    data: Data,
    spec: MethodSpec,
    seed: int,
    rdir: Path,
    teacher_layers: list[int],
    student_layers: list[int],
    teacher_shapes: dict[int, tuple[int, ...]],
    source: TeacherSource | None,
    teacher_model: torch.nn.Module | None,
    ranks: Ranks = SINGLE,
    run_extra: dict | None = None,
) -> RunResult:
    """run_extra: entries of config.yaml's `run` that replace this function's (several teachers)."""
    train_cfg = dataclasses.replace(cfg.train, seed=seed)
    resolved = {
        **to_dict(dataclasses.replace(cfg, train=train_cfg, seeds=[seed])),
        "method": dataclasses.asdict(spec),
        "run": {
            "kind": "student",
            "method": spec.name,
            "seed": seed,
            "run_hash": artifacts.split_hashed(rdir.parent.name)[1],
            "teacher_id": artifacts.teacher_id(cfg, data) if source is not None else None,
            "teacher_layers": teacher_layers,
            "student_layers": student_layers,
            "versions": versions(),
            "ranks": ranks.world,
            **(run_extra or {}),
        },
    }
    if ranks.is_main:
        log.info("distill %s seed %d -> %s", spec.name, seed, rdir)
    with artifacts.attempt(rdir, resolved, writer=ranks.is_main):
        result = _fit_student(cfg, data, spec, train_cfg, rdir, resolved, teacher_layers, student_layers, teacher_shapes, source, teacher_model, ranks)
        if ranks.is_main:
            finish(rdir, result)
    if not ranks.is_main:
        return RunResult(seed, rdir, False, result.best_test_acc)
    log.info("distill %s seed %d: best test accuracy %.2f%% (epoch %d), last %.2f%%", spec.name, seed, result.best_test_acc, result.best_epoch, result.last_test_acc)
    return RunResult(seed, rdir, False, result.best_test_acc)


def _fit_student(
    cfg: Config,
    data: Data,
    spec: MethodSpec,
    train_cfg: TrainConfig,
    rdir: Path,
    resolved: dict,
    teacher_layers: list[int],
    student_layers: list[int],
    teacher_shapes: dict[int, tuple[int, ...]],
    source: TeacherSource | None,
    teacher_model: torch.nn.Module | None,
    ranks: Ranks,
) -> FitResult:
    seed = train_cfg.seed
    train_rows = data.training_subset(train_cfg.train_subset, cfg.dataset.split_seed)
    seed_everything(seed)
    student = create_model(
        cfg.student.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=cfg.student.width
    )
    distiller = build_distiller(
        spec,
        student,
        num_classes=data.num_classes,
        input_shape=(data.in_channels, data.image_size, data.image_size),
        teacher_layers=teacher_layers,
        student_layers=student_layers,
        teacher_shapes=teacher_shapes,
        teacher=teacher_model,
        batch_size=train_cfg.batch_size,
        train_rows=torch.as_tensor(train_rows),
        train_labels=data.train.labels,
    )
    model_spec = MODELS.get(cfg.student.name)
    lr = train_cfg.lr if train_cfg.lr is not None else (model_spec.lr_kd if spec.needs_teacher else model_spec.lr_ce)
    return fit(
        distiller,
        data,
        train_cfg,
        rdir,
        lr=lr,
        train_indices=train_rows,
        teacher=source,
        weights_of=student,
        desc=f"{spec.name} s{seed}",
        ranks=ranks,
        run_config=resolved,
    )
