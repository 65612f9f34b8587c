"""Stage 1: profile the teacher (METHOD 6, 7; section 0 items 2-4, 9) and hand over to stage 2.

Steps, each skipped when its artifact is already valid, each keyed by what it depends on:

    <teacher dir>/                          teacher.pt (common/profile/teacher.py)
    <teacher dir>/quality-<qhash>/          layer_stats.csv: S, I, E, Q... of every generalized layer
                                            (keyed by the analysis pool and subsets only), and
                                            activations.h5 with subset A's features when
                                            profile.keep_activations is set
    <teacher dir>/profile-<phash>/          the selection (keyed by the subsets plus k, criterion
                                            and an explicit list): profile.yaml (the manifest
                                            stage 2 reads), quality.csv, quality.png, selection.yaml,
                                            torchdistill_<student>.yaml (forward hooks, per student)
    <teacher dir>/features-<dtype>.h5       teacher outputs for the students' training rows

1. train the teacher unless finished;
2. S, I, E, Q of every layer, streamed (common/quality/stream.py): no layer of the analysis
   pool is ever held whole or written to disk; memory is bounded by profile.memory_budget_mb;
3. top-k by every criterion, the configured selection, the manifest;
4. the selected and baseline layers plus the logits for the rows of the students' training
   subset (train.train_subset) -> features-<dtype>.h5; a later run that needs more rows or
   layers extends it (`ensure_features`).

Stage 2 never re-derives any of this: it reads profile.yaml through `load_manifest` and turns a
method's layer word into indices with `Manifest.teacher_layers`.

This module runs the steps in order; each has its own home: the layer tables in
common/layers/tables.py, step 2 in common/profile/stats.py, step 3 and the manifest in
common/profile/manifest.py, step 4 in common/profile/features.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.artifacts import layout as artifacts
from common.config import CRITERIA, Config, to_dict, validate_config
from common.data.registry import Data, load_data
from common.errors import ConfigError
from common.files import atomic_write_yaml, file_lock
from common.runtime import versions
from common.layers.tables import layer_infos_for
from common.layers.hooks import resolve_layers
from common.models import MODELS
from common.profile.features import ensure_features_with, no_cache_reason
from common.profile.forward_hooks import hook_file, write_forward_hooks
from common.profile.manifest import Manifest, load_manifest, select_teacher_layers, write_manifest, write_selection
from common.profile.stats import ensure_quality, log_step
from common.profile.teacher import ensure_teacher, load_teacher
from common.runtime import resolve_device

log = logging.getLogger("kd")


@dataclass
class Profile:
    """What `run` returns: the profile directory, the quality table, the selection, the feature
    cache and the manifest written from them."""

    dir: Path
    quality: pd.DataFrame
    selected: list[int]
    features: Path | None  # None: no cache, the students use the live teacher (`features.no_cache_reason` says why)
    manifest: Manifest


def validate(cfg: Config, n_layers: int) -> None:
    """The profile settings that need the teacher's layer count or the criteria (the plain ranges
    are `common.config.validate_config`'s), checked before a teacher is trained or a file written."""
    p = cfg.profile
    if p.criterion not in CRITERIA:
        raise ConfigError(f"profile.criterion is '{p.criterion}'; choose one of {', '.join(CRITERIA)}")
    if p.k < 1 or p.k > n_layers:
        raise ConfigError(f"profile.k={p.k} but the teacher has {n_layers} generalized layers; choose 1..{n_layers}")
    if p.layers:
        resolved = resolve_layers(p.layers, n_layers, "profile.layers entry")
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"profile.layers {p.layers} names a layer twice; list each teacher layer once")


def run(cfg: Config, data: Data | None = None) -> Profile:
    """Run every stage-1 step that is not already done; returns the profile (with several
    `teachers`: common/profile/multi.py profiles each and returns the first's profile)."""
    validate_config(cfg)  # configs changed in code skip load_config's check
    from common.profile import multi  # several teachers: each profiled by this function, then pooled

    if multi.is_multi(cfg):
        multi.run(cfg, data)
        return run(multi.config_of(cfg, multi.teacher_configs(cfg)[0]), data)
    cfg = multi.single_config(cfg)
    MODELS.get(cfg.teacher.name)
    data = data if data is not None else load_data(cfg.dataset)
    validate(cfg, len(layer_infos_for(cfg.teacher, data)))
    tic = time.perf_counter()
    ensure_teacher(cfg, data)
    log_step("teacher", tic)
    device = resolve_device(cfg.profile.device)
    teacher, teacher_sha = load_teacher(cfg, data, device)
    stats = ensure_quality(cfg, data, teacher, teacher_sha, device)
    pdir = artifacts.profile_dir(cfg, data)
    with file_lock(pdir / ".lock"):
        if not (pdir / artifacts.CONFIG).exists():
            atomic_write_yaml(pdir / artifacts.CONFIG, {**to_dict(cfg), "run": {"kind": "profile", "versions": versions()}})
        quality, top_k, selected, how = select_teacher_layers(cfg, stats)
        previous = load_manifest(cfg, data)
        if previous is not None and previous.data["teacher"]["sha256"] == teacher_sha and previous.selected == selected:
            log.info("profile: selection %s (%s) is up to date", selected, how)
        else:
            write_selection(cfg, pdir, quality, selected, how)
        if previous is None or previous.selected != selected or not hook_file(pdir, cfg.student.name).exists():
            write_forward_hooks(cfg, data, pdir, selected, how)
        needed = sorted(set(selected) | set(MODELS.get(cfg.teacher.name).baseline_layers))
        tic = time.perf_counter()
        rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
        features = None
        no_cache = no_cache_reason(cfg, data)
        if no_cache is None:
            features = ensure_features_with(cfg, data, teacher, teacher_sha, needed, rows, device)
            log_step("features", tic)
        else:
            log.info("profile: no feature cache (%s); students use the live teacher, train.teacher_source=cache writes one", no_cache)
        manifest = write_manifest(cfg, data, pdir, teacher_sha, quality, top_k, selected, how, features)
        (pdir / artifacts.DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return Profile(pdir, quality, selected, features, manifest)


def manifest_for(cfg: Config, data: Data) -> Manifest:
    """The profile manifest, running stage 1 first when it is missing."""
    manifest = load_manifest(cfg, data)
    return manifest if manifest is not None else run(cfg, data).manifest
