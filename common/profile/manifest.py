"""Stage 1's selection and hand-over (METHOD 0.4, 7): top-k by every criterion and the configured
selection (quality.csv, selection.yaml, quality.png), and profile.yaml, the manifest stage 2 reads
through `load_manifest` and turns a method's layer word into indices with `Manifest.teacher_layers`."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from common.artifacts import layout as artifacts
from common.train import tracking
from common.cache.reader import FeatureCache
from common.config import CRITERIA, Config, to_dict
from common.data.registry import Data
from common.errors import CacheError, ConfigError, DataError
from common.files import atomic_write, atomic_write_text, atomic_write_yaml
from common.runtime import code_version
from common.layers.tables import layer_shapes
from common.layers.hooks import resolve_layers
from common.models import MODELS
from common.profile.features import rebuild_hint
from common.profile.stats import stats_meta
from common.quality.formulas import select_layers
from common.quality.table import top_k_by_criterion, undefined_criteria

log = logging.getLogger("kd")

QUALITY = "quality.csv"
SELECTION = "selection.yaml"
MANIFEST = "profile.yaml"


@dataclass(frozen=True)
class Manifest:
    """Stage 1's hand-over to stage 2, as written in profile.yaml."""

    dir: Path
    data: dict[str, Any]

    @property
    def selected(self) -> list[int]:
        return list(self.data["selection"]["layers"])

    @property
    def features(self) -> Path | None:
        """The feature cache, None when stage 1 wrote none (a streamed dataset's live teacher)."""
        info = self.data.get("features")
        return (self.dir / info["path"]).resolve() if info else None

    def teacher_layers(self, which: str) -> list[int]:
        """The teacher layers a method names by word: "selected" (the configured selection:
        top-k by profile.criterion, or profile.layers) or a criterion (its top-k)."""
        if which == "selected":
            return self.selected
        if which in CRITERIA:
            layers = self.data["top_k"].get(which)
            if layers is None:
                raise DataError(f"{self.dir / MANIFEST}: no top-{self.data['top_k']['k']} by {which} (too few layers with a finite {which})")
            return list(layers)
        raise ConfigError(f"teacher layers '{which}' are not a profile selection; use selected or one of {', '.join(CRITERIA)}")


def load_manifest(cfg: Config, data: Data) -> Manifest | None:
    """The finished profile's manifest for this config, or None when stage 1 has not run."""
    pdir = artifacts.profile_dir(cfg, data)
    path = pdir / MANIFEST
    if not (pdir / artifacts.DONE).exists() or not path.exists():
        return None
    try:
        return Manifest(pdir, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as exc:
        raise CacheError(f"{path} cannot be read ({type(exc).__name__}); delete it and rerun: {rebuild_hint(cfg)}") from None


def select_teacher_layers(cfg: Config, stats: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any], list[int], str]:
    """Top-k by every criterion (the paper's ablations) and the configured selection (METHOD 0.4):
    (quality table with `selected` and `undefined` columns, top-k per criterion, selection, how)."""
    k = cfg.profile.k
    top_k = top_k_by_criterion(stats, k)
    if cfg.profile.layers:
        selected = sorted(resolve_layers(cfg.profile.layers, len(stats), "profile.layers entry"))
        how = "explicit"
    else:
        if top_k[cfg.profile.criterion] is None:
            select_layers(dict(zip(stats["layer"].astype(int), stats[cfg.profile.criterion].astype(float))), k)  # raises, naming why
        selected = top_k[cfg.profile.criterion]
        how = f"top-{k} by {cfg.profile.criterion}"
    quality = stats.copy()
    quality["selected"] = quality["layer"].isin(selected)
    quality["undefined"] = undefined_criteria(stats)
    for layer, names in zip(quality["layer"], quality["undefined"]):
        if names:
            log.info("profile: layer %d has no finite %s (zero or non-finite features); never selected by them", layer, names)
    return quality, top_k, selected, how


def write_selection(cfg: Config, pdir: Path, quality: pd.DataFrame, selected: list[int], how: str) -> None:
    """quality.csv, selection.yaml and quality.png, for people."""
    atomic_write(pdir / QUALITY, lambda tmp: quality.to_csv(tmp, index=False))
    atomic_write_yaml(
        pdir / SELECTION,
        {"criterion": cfg.profile.criterion, "k": cfg.profile.k, "how": how, "layers": selected,
         "baseline_layers": list(MODELS.get(cfg.teacher.name).baseline_layers)},
    )
    from common.plots import plot_quality  # here: matplotlib's import (0.8 s) only when a profile is written

    plot_quality(quality, selected, pdir / "quality.png", title=f"{cfg.teacher.name} on {cfg.dataset.name}")
    _track_quality(cfg, pdir, quality)
    log.info("profile: selected teacher layers %s (%s)", selected, how)


def _track_quality(cfg: Config, pdir: Path, quality: pd.DataFrame) -> None:
    """The S/I/E/Q curve (step = layer index) for the teacher's tracker, replacing older events."""
    shutil.rmtree(pdir / "tb", ignore_errors=True)
    tracker = tracking.open_tracker(cfg.teacher_train.tracker, pdir, f"profile {cfg.teacher.name}", to_dict(cfg.profile))
    try:
        for _, row in quality.iterrows():
            values = {f"quality/{c}": float(row[c]) for c in CRITERIA if c in row and pd.notna(row[c])}
            tracker.log(values, int(row["layer"]))
    finally:
        tracker.close()


def write_manifest(
    cfg: Config, data: Data, pdir: Path, teacher_sha: str, quality: pd.DataFrame, top_k: dict[str, Any],
    selected: list[int], how: str, features: Path | None,
) -> Manifest:
    """profile.yaml: the teacher, the data, the layer table with S/I/E/Q, the top-k by every
    criterion, the selection, the baseline list and the feature cache (path, dtype, layers, rows)."""
    shapes = layer_shapes(cfg, data)
    columns = ["S", "I", "E", "Q", "sqrtIE"]
    layers = [
        {"index": int(row.layer), "module": str(row.module), "shape": list(shapes[int(row.layer)]), "dim": int(row.dim),
         **{c: float(getattr(row, c)) for c in columns}}
        for row in quality.itertuples()
    ]
    feature_info = None
    if features is not None:
        with FeatureCache(features) as cache:
            feature_info = {
                "path": f"../{features.name}", "dtype": cache.meta.get("dtype"), "layers": list(cache.meta.get("layers", [])),
                "rows": int(cache.n),
            }
    subset_meta = stats_meta(cfg, data)
    content = {
        "teacher": {"name": cfg.teacher.name, "id": artifacts.teacher_id(cfg, data), "sha256": teacher_sha},
        "dataset": {"name": cfg.dataset.name, "fingerprint": data.fingerprint, "n_train": len(data.train.labels)},
        "quality": {"dir": f"../{artifacts.quality_dir(cfg, data).name}", **artifacts.quality_key(cfg),
                    **{k: subset_meta.get(k) for k in ("n_pool", "n_subset_a", "n_subset_b")}},
        "layers": layers,
        "top_k": top_k,
        "selection": {"criterion": cfg.profile.criterion, "how": how, "layers": selected},
        "baseline_layers": list(MODELS.get(cfg.teacher.name).baseline_layers),
        "features": feature_info,
        "code_version": code_version(),
    }
    path = pdir / MANIFEST
    text = yaml.safe_dump(content, sort_keys=False)
    if not path.exists() or path.read_text() != text:  # a rerun with nothing new leaves the file untouched (text: NaN != NaN)
        atomic_write_text(path, text)
    return Manifest(pdir, content)
