"""The student's own profile (`method.student_layers=Q`): S, I, E, Q of a CE-trained student's
generalized layers, computed by stage 1's own code, and its top-k by Q.

Which checkpoint: the `ce` run of seed 0 (`PROFILE_SEED`), for every seed of every run. One
profile per config means one student list for all seeds, so a map is compared with `ours` paired
by seed with only the training seed varying, not the list too; seed 0 because every study and
the demo run it (the default `seeds: [0]`, the study's "0 1 2"). The `ce` run is the same run the
study's `ce` arm and `make distill METHOD=ce` make (the config with `method.name=ce`), trained first
when it is missing unless `profile.train_student_ce=false`.

Keys: the profile lives in `<artifacts>/<dataset>/<student>-<hash>/`, keyed as an as-is teacher is,
by the checkpoint file's sha256 (`common.artifacts.layout.student_model_dir`), so the profile of
another checkpoint is never reused; under it `quality-<qhash>/` (layer_stats.csv, by
`common.profile.stats.ensure_quality`) and `profile-<phash>/` (student_profile.yaml, quality.csv,
done), keyed by the same profile settings as the teacher's. Stage 2 reads student_profile.yaml
(`manifest_for`), building it first under the profile directory's lock when it is missing; it
never computes Q itself.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.artifacts import layout as artifacts
from common.config import Config, MethodConfig, TeacherConfig
from common.data.registry import Data
from common.errors import CacheError, ConfigError, DataError
from common.files import atomic_write, atomic_write_yaml, file_lock, sha256_file

log = logging.getLogger("kd")

PROFILE_SEED = 0  # the `ce` run whose student.pt is profiled, for every seed (see the module docstring)
MANIFEST = "student_profile.yaml"
QUALITY = "quality.csv"
WEIGHTS = "student.pt"


@dataclass(frozen=True)
class StudentProfile:
    """student_profile.yaml as written: the checkpoint, the layer table with S/I/E/Q, the top-k."""

    dir: Path
    data: dict[str, Any]

    @property
    def top_q(self) -> list[int]:
        """The student's top-k layers by Q, in depth order."""
        layers = self.data["top_k"].get("Q")
        if layers is None:
            raise DataError(f"{self.dir / MANIFEST}: the student has fewer than k={self.data['top_k']['k']} layers with a finite Q; "
                            "lower profile.k or give method.student_layers=[...]")
        return sorted(int(j) for j in layers)


def ce_config(cfg: Config) -> Config:
    """`cfg` as the `ce` run it profiles: method.name=ce, seed PROFILE_SEED, everything else kept."""
    return dataclasses.replace(cfg, method=MethodConfig(name="ce"), seeds=[PROFILE_SEED])


def ce_run_dir(cfg: Config, data: Data) -> Path:
    """The run directory of seed PROFILE_SEED's `ce` run for this config (stage 2's own key)."""
    from common import distill
    from common.methods import resolve_run_method

    ce = ce_config(cfg)
    return distill.run_dirs(ce, data, resolve_run_method(ce), [], [PROFILE_SEED])[PROFILE_SEED]


def _finished_checkpoint(cfg: Config, data: Data) -> Path | None:
    run = ce_run_dir(cfg, data)
    return run / WEIGHTS if (run / artifacts.DONE).exists() and (run / WEIGHTS).exists() else None


def check_available(cfg: Config, data: Data) -> None:
    """Refuse `Q` before anything trains when seed 0's `ce` run is not finished and
    profile.train_student_ce=false forbids training it."""
    if cfg.profile.train_student_ce or _finished_checkpoint(cfg, data) is not None:
        return
    raise ConfigError(
        f"method.student_layers=Q profiles the CE student of seed {PROFILE_SEED}, which has no finished run "
        f"({ce_run_dir(cfg, data)}); train it first (make distill METHOD=ce SEEDS={PROFILE_SEED} with this config) "
        "or set profile.train_student_ce=true"
    )


def _profile_cfg(cfg: Config) -> Config:
    """The config stage 1's code sees: the student model in the teacher's place, its profile
    settings, top-k by Q (an explicit profile.layers list names teacher layers, not student ones)."""
    s = cfg.student
    return dataclasses.replace(
        cfg, teacher=TeacherConfig(name=s.name, width=s.width),
        profile=dataclasses.replace(cfg.profile, criterion="Q", layers=None, keep_activations=False),
    )


def load(cfg: Config, data: Data) -> StudentProfile | None:
    """The finished student profile of this config's `ce` checkpoint; None when the run or the
    profile is missing. Reads only (the study report uses it)."""
    checkpoint = _finished_checkpoint(cfg, data)
    if checkpoint is None:
        return None
    return _read(artifacts.student_profile_dirs(cfg, data, sha256_file(checkpoint))[1])


def _read(pdir: Path) -> StudentProfile | None:
    path = pdir / MANIFEST
    if not (pdir / artifacts.DONE).exists() or not path.exists():
        return None
    try:
        return StudentProfile(pdir, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as exc:
        raise CacheError(f"{path} cannot be read ({type(exc).__name__}); delete {pdir} and rerun") from None


def manifest_for(cfg: Config, data: Data) -> StudentProfile:
    """The student profile, built first when missing: seed 0's `ce` run (unless
    profile.train_student_ce=false: then an error), then S/I/E/Q of its student.pt, under the
    profile directory's lock, so concurrent runs build it once."""
    check_available(cfg, data)
    checkpoint = _finished_checkpoint(cfg, data)
    if checkpoint is None:
        from common import distill

        log.info("student profile: training the CE student of seed %d first (%s)", PROFILE_SEED, ce_run_dir(cfg, data))
        distill.run(ce_config(cfg), seeds=[PROFILE_SEED], data=data)
        checkpoint = _finished_checkpoint(cfg, data)
        if checkpoint is None:
            raise DataError(f"the CE student of seed {PROFILE_SEED} did not finish ({ce_run_dir(cfg, data)}); see its failed file")
    sha = sha256_file(checkpoint)
    qdir, pdir = artifacts.student_profile_dirs(cfg, data, sha)
    with file_lock(pdir / ".lock"):
        found = _read(pdir)
        if found is not None:
            return found
        return _build(cfg, data, checkpoint, sha, qdir, pdir)


def _build(cfg: Config, data: Data, checkpoint: Path, sha: str, qdir: Path, pdir: Path) -> StudentProfile:
    """S/I/E/Q by stage 1's `ensure_quality`, the top-k by stage 1's `select_teacher_layers`."""
    import torch

    from common.models import MODELS, create_model
    from common.profile.manifest import select_teacher_layers
    from common.profile.stats import STATS_META, ensure_quality
    from common.runtime import code_version, resolve_device

    pcfg = _profile_cfg(cfg)
    s = cfg.student
    tic = time.perf_counter()
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["best"]
        model = create_model(s.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=s.width)
        model.load_state_dict(state)
    except Exception as exc:
        raise CacheError(f"student checkpoint {checkpoint} cannot be loaded ({type(exc).__name__}); delete its run "
                         f"directory {checkpoint.parent} and rerun") from None
    device = resolve_device(cfg.profile.device)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    stats = ensure_quality(pcfg, data, model, sha, device, qdir=qdir)
    quality, top_k, _, _ = select_teacher_layers(pcfg, stats)
    meta = yaml.safe_load((qdir / STATS_META).read_text()) or {}
    content = {
        "student": {"name": s.name, "width": s.width, "checkpoint": str(checkpoint), "sha256": sha, "ce_seed": PROFILE_SEED},
        "dataset": {"name": cfg.dataset.name, "fingerprint": data.fingerprint, "n_train": len(data.train.labels)},
        "quality": {"dir": f"../{qdir.name}", **artifacts.quality_key(cfg), **{k: meta.get(k) for k in ("n_pool", "n_subset_a", "n_subset_b")}},
        "layers": [{"index": int(r.layer), "module": str(r.module), "dim": int(r.dim),
                    **{c: float(getattr(r, c)) for c in ("S", "I", "E", "Q", "sqrtIE")}} for r in quality.itertuples()],
        "top_k": top_k,
        "baseline_layers": list(MODELS.get(s.name).baseline_layers),
        "code_version": code_version(),
    }
    atomic_write(pdir / QUALITY, lambda tmp: quality.to_csv(tmp, index=False))
    atomic_write_yaml(pdir / MANIFEST, content)
    (pdir / artifacts.DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    log.info("student profile: %s top-%d by Q %s (%.1fs, %s)", s.name, top_k["k"], top_k.get("Q"), time.perf_counter() - tic, pdir)
    return StudentProfile(pdir, content)
