"""Stage 2 with several teachers: one student distilled from the selected (teacher, layer) pairs.

`common.distill.run` hands a config with two or more `teachers` here (common/train/multi_teacher.py). The pairs come from stage
1's multi-teacher manifest (common/profile/multi.py: `teacher_rule` and the method's layer word),
paired with the student layers in depth order. Each teacher is read from its own feature cache
when the students read caches (train.teacher_source), live in eval mode otherwise; one projector
per pair, and, as for one teacher, no logit loss reaches the backbone (only logit-free feature
methods are allowed: CE reaches the detached head alone in `ours`).

Run directories: <artifacts>/<dataset>/<A>+<B>__<student>/<method>-<rhash>/seed<k>/, keyed as a
single-teacher run plus every teacher's id, layers and cache dtype, the pairing and the rule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.artifacts import layout as artifacts
from common.config import Config, short_hash
from common.data.registry import Data
from common.errors import ConfigError
from common.method_spec import MethodSpec, hashed_fields
from common.models import MODELS
from common.profile import multi
from common.train.distributed import SINGLE, Ranks

log = logging.getLogger("kd")


@dataclass(frozen=True)
class Plan:
    """A multi-teacher run's resolved pairs: (teacher, teacher layer, student layer) in depth order."""

    names: list[str]
    teacher_configs: list[Config]
    triples: list[tuple[int, int, int]]

    @property
    def student_layers(self) -> list[int]:
        return [j for _, _, j in self.triples]

    def layers_of(self, t: int) -> list[int]:
        return sorted(layer for tt, layer, _ in self.triples if tt == t)

    def labels(self) -> list[str]:
        """'resnet34:14' per pair: the teacher of every distilled layer, in pairing order."""
        return [f"{self.names[t]}:{layer}" for t, layer, _ in self.triples]


def check_method(spec: MethodSpec, m: int) -> None:
    """Several teachers serve feature methods without teacher logits or teacher modules, paired
    one-to-one: a logit loss would need one set of teacher logits, SimKD one teacher's head."""
    if not spec.needs_teacher_features or spec.needs_teacher_logits or spec.needs_teacher_model or spec.mapping != "one2one":
        raise ConfigError(f"method {spec.name} with {m} teachers: several teachers serve logit-free feature methods paired "
                          "one-to-one (ours, ours_*, stl_seplin, fitnet_nokd); choose one of them or one teacher")
    if not isinstance(spec.teacher_layers, str):
        raise ConfigError(f"method.teacher_layers={list(spec.teacher_layers)} names one teacher's layers; with {m} teachers use "
                          "a word: selected, baseline or a criterion (teacher_rule picks how)")


def student_layers_of(cfg: Config, spec: MethodSpec, data: Data) -> list[int]:
    from common.layers.hooks import resolve_layers
    from common.layers.tables import layer_infos_for

    if spec.student_layers == "baseline":
        return list(MODELS.get(cfg.student.name).baseline_layers)
    return resolve_layers(spec.student_layers, len(layer_infos_for(cfg.student, data)), "student layer")


def resolve(cfg: Config, spec: MethodSpec, data: Data, manifest: multi.MultiManifest | None = None) -> Plan:
    """The pairs of a multi-teacher run, from the manifest (stage 1 run first when missing)."""
    teachers = multi.teacher_configs(cfg)
    check_method(spec, len(teachers))
    manifest = manifest or multi.manifest_for(cfg, data)
    pairs = manifest.pairs(str(spec.teacher_layers), cfg.teacher_rule)
    triples = multi.pair_in_depth_order(pairs, manifest.n_layers, student_layers_of(cfg, spec, data))
    return Plan(manifest.names, [multi.config_of(cfg, t) for t in teachers], triples)


def check(cfg: Config, spec: MethodSpec, data: Data) -> None:
    """What can be checked before stage 1 runs: the method, the rule against k, the student layers."""
    from common.layers.tables import layer_infos_for

    teachers = multi.teacher_configs(cfg)
    check_method(spec, len(teachers))
    multi.validate(cfg, [len(layer_infos_for(t, data)) for t in teachers])
    students = student_layers_of(cfg, spec, data)
    twice = sorted({j for j in students if students.count(j) > 1})
    if twice:
        raise ConfigError(f"student layer {twice[0]} is claimed twice in method.student_layers {students}; list each once")
    if len(students) != cfg.profile.k:
        raise ConfigError(f"method {spec.name} pairs profile.k={cfg.profile.k} teacher layers one-to-one with student layers "
                          f"{students}; give as many of each (profile.k or method.student_layers=[...])")


def run_key(cfg: Config, data: Data, spec: MethodSpec, plan: Plan) -> dict[str, Any]:
    """A single-teacher run's key without its teacher, plus every teacher's identity and layers."""
    key = artifacts.run_key(plan.teacher_configs[0], data, hashed_fields(spec), None)
    key["teachers"] = [{"id": artifacts.teacher_id(c, data), **artifacts.teacher_use(plan.layers_of(t), cfg.profile.cache_dtype)}
                       for t, c in enumerate(plan.teacher_configs)]
    key["pairs"] = [list(p) for p in plan.triples]
    key["teacher_rule"] = cfg.teacher_rule
    return key


def run_dirs(cfg: Config, data: Data, spec: MethodSpec, plan: Plan, seeds: list[int]) -> dict[int, Path]:
    pair = artifacts.dir_name(artifacts.pair_name(multi.joined_name(cfg), cfg.student.name))
    variant = f"{spec.name}-{short_hash(run_key(cfg, data, spec, plan))}"
    return {s: Path(cfg.artifacts) / cfg.dataset.name / pair / variant / f"seed{s}" for s in seeds}


def teacher_source(cfg: Config, data: Data, plan: Plan, device: Any) -> Any:
    """Every teacher from its cache (when the students read caches) or live, under pair keys."""
    import torch

    from common.cache.reader import FeatureCache
    from common.profile.features import ensure_features, rebuild_hint, wants_cache
    from common.profile.teacher import load_teacher
    from common.runtime import ram_budget
    from common.train.inputs import rows_nbytes
    from common.train.multi_source import MultiTeacher
    from common.train.teacher_source import CachedTeacher, LiveTeacher

    rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
    sources, keys = [], []
    m = len(plan.teacher_configs)
    for t, c in enumerate(plan.teacher_configs):
        layers = plan.layers_of(t)
        keys.append({layer: p for p, (tt, layer, _) in enumerate(plan.triples) if tt == t})
        if wants_cache(c, data):
            cache = FeatureCache(ensure_features(c, data, layers, rows), rebuild_hint=rebuild_hint(c))
            sources.append(CachedTeacher(cache, layers, False, device, ram_budget() // m, rows=torch.as_tensor(rows),
                                         input_path=cfg.train.input_path, image_bytes=rows_nbytes(data.train.images, len(rows))))
        else:
            sources.append(LiveTeacher(load_teacher(c, data, device)[0], layers, False))
    return MultiTeacher(sources, keys)


def run(cfg: Config, seeds: list[int] | None = None, restart: bool = False, data: Data | None = None, ranks: Ranks = SINGLE) -> list[Any]:
    """`common.distill.run` for several teachers: checks, pairs, then one student per seed."""
    from common import distill
    from common.checks import load_data_checked
    from common.layers.tables import layer_shapes
    from common.methods import resolve_run_method
    from common.profile.teacher import ensure_teacher
    from common.runtime import resolve_device
    from common.train import distributed
    from common.train.loop import CHECKPOINT

    seeds = list(seeds if seeds is not None else cfg.seeds)
    spec = resolve_run_method(cfg)
    teachers = multi.teacher_configs(cfg)
    if not spec.needs_teacher:  # the CE student reads no teacher: the first teacher's run, as alone
        return distill.run(multi.config_of(cfg, teachers[0]), seeds, restart, data, ranks)
    if ranks.world > 1:
        raise ConfigError("several teachers run on one process; drop NPROC / torchrun or distil from one teacher")
    configs = [multi.config_of(cfg, t) for t in teachers]
    data = load_data_checked(configs[0], data)
    for c in configs[1:]:
        load_data_checked(c, data)
    check(cfg, spec, data)  # before any teacher is trained or profiled
    plan = resolve(cfg, spec, data)
    dirs = run_dirs(cfg, data, spec, plan, seeds)
    results = [distill.RunResult(s, dirs[s], True) for s in seeds if (dirs[s] / artifacts.DONE).exists()]
    for r in results:
        log.info("distill %s seed %d: finished, skipping (%s)", spec.name, r.seed, r.dir)
    todo = [s for s in seeds if not (dirs[s] / artifacts.DONE).exists()]
    if not todo:
        return results
    shapes = {}
    for c in plan.teacher_configs:
        ensure_teacher(c, data)
    for p, (t, layer, _) in enumerate(plan.triples):
        shapes[p] = layer_shapes(plan.teacher_configs[t], data)[layer]
    log.info("distill %s: teachers' layers %s -> student layers %s (%s)", spec.name, " ".join(plan.labels()), plan.student_layers, cfg.teacher_rule)
    device = resolve_device(cfg.train.device)
    source = teacher_source(cfg, data, plan, device)
    ids = [artifacts.teacher_id(c, data) for c in plan.teacher_configs]
    # teacher_id stays one string (stage 3 groups runs by it); every teacher's id is in teacher_ids
    extra = {"teacher_id": multi.NAME_SEP.join(ids), "teacher_ids": ids, "teacher_layers": plan.labels(),
             "teachers": plan.names, "teacher_rule": cfg.teacher_rule,
             "pairs": [{"teacher": plan.names[t], "teacher_layer": layer, "student_layer": j} for t, layer, j in plan.triples]}
    run_cfg = multi.config_of(cfg, teachers[0])
    for seed in todo:
        rdir = dirs[seed]
        with artifacts.locked(rdir):
            if (rdir / artifacts.DONE).exists():
                results.append(distill.RunResult(seed, rdir, True))
                continue
            if restart and (rdir / CHECKPOINT).exists():
                (rdir / CHECKPOINT).unlink()
            results.append(distill._train_one(run_cfg, data, spec, seed, rdir, list(range(len(plan.triples))), plan.student_layers,
                                              shapes, source, None, distributed.SINGLE, run_extra={**extra, "teachers_config": cfg.teachers}))
    return sorted(results, key=lambda r: r.seed)
