"""Stage 1: profile the teacher (METHOD 6, 7; section 0 items 2-4, 9).

Steps, each skipped when its artifact is already valid:
1. train the teacher (common/teacher.py) unless finished;
2. draw the seeded Q subsets A and B from the training split and extract EVERY generalized
   layer for their union only into activations.h5 (section 0 item 3), streaming batch by batch;
3. S, I, E, Q per layer -> quality.csv, quality.png;
4. top-k selection (or an explicit list) -> selection.yaml;
5. the selected layers (plus the teacher's baseline list, which the baselines distil from) and
   the teacher's logits for the whole training split -> features.h5 (float16 by default).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
import yaml

from common import artifacts
from common.cache import FeatureCache, write_h5
from common.config import Config, to_dict
from common.data import Data, load_data
from common.errors import CacheError, ConfigError
from common.io import atomic_write, atomic_write_yaml, code_version, file_lock, peak_rss_mb, versions
from common.layers import LayerInfo, extract, forward_with_features, layer_table, resolve_layers
from common.models import MODELS
from common.quality import CRITERIA, draw_subsets, layer_stats, select_layers
from common.report import plot_quality
from common.teacher import build_teacher, ensure_teacher, layer_name, load_teacher
from common.train import resolve_device

log = logging.getLogger("kd")

QUALITY = "quality.csv"
SELECTION = "selection.yaml"
ACTIVATIONS = "activations.h5"
FEATURES = "features.h5"


@dataclass
class Profile:
    dir: Path
    quality: pd.DataFrame
    selected: list[int]
    features: Path


def list_layers(cfg: Config, data: Data) -> pd.DataFrame:
    """Index, module path, output shape and bytes per sample of each generalized layer (METHOD 4)."""
    table = _teacher_layers(cfg, data)
    baseline = set(MODELS.get(cfg.teacher.name).baseline_layers)
    return pd.DataFrame(
        {
            "layer": t.index,
            "module": t.path,
            "kind": t.kind,
            "shape": "x".join(map(str, t.shape)),
            "dim": t.dim,
            "bytes_per_sample": t.bytes_per_sample,
            "baseline": t.index in baseline,
        }
        for t in table
    )


def layer_shapes(cfg: Config, data: Data) -> dict[int, tuple[int, ...]]:
    """Per-sample output shape of every teacher generalized layer."""
    return {t.index: t.shape for t in _teacher_layers(cfg, data)}


def _teacher_layers(cfg: Config, data: Data) -> list[LayerInfo]:
    """The teacher's generalized layers with their shapes, from one dummy forward of an untrained copy."""
    return layer_table(build_teacher(cfg, data), (data.in_channels, data.image_size, data.image_size))


def cache_identity(teacher_sha: str, data: Data) -> dict[str, str]:
    """What makes cached teacher outputs valid: the checkpoint, the data (with preprocessing), the split."""
    return {"teacher_sha256": teacher_sha, "dataset": data.fingerprint, "split": "train"}


def run(cfg: Config, data: Data | None = None) -> Profile:
    """Run every stage-1 step that is not already done; returns the profile."""
    MODELS.get(cfg.teacher.name)
    data = data if data is not None else load_data(cfg.dataset)
    ensure_teacher(cfg, data)
    pdir = artifacts.profile_dir(cfg, data)
    with file_lock(pdir / ".lock"):
        if not (pdir / "config.yaml").exists():
            atomic_write_yaml(pdir / "config.yaml", {**to_dict(cfg), "run": {"kind": "profile", "versions": versions()}})
        device = resolve_device(cfg.profile.device)
        teacher, teacher_sha = load_teacher(cfg, data, device)
        quality = _ensure_quality(cfg, data, teacher, teacher_sha, pdir, device)
        selected = _ensure_selection(cfg, quality, pdir)
        needed = sorted(set(selected) | set(MODELS.get(cfg.teacher.name).baseline_layers))
        features = _ensure_features(cfg, data, teacher, teacher_sha, pdir, needed, device)
        (pdir / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return Profile(pdir, quality, selected, features)


def ensure_features(cfg: Config, data: Data, layers: list[int]) -> Path:
    """features.h5 holding at least `layers` (stage 2 calls this; extends the cache if needed).

    A cache made from another teacher checkpoint or other data is refused, not rebuilt: the
    profile's layer selection is stale too, and stage 1 is the command that rebuilds both.
    """
    pdir = artifacts.profile_dir(cfg, data)
    with file_lock(pdir / ".lock"):
        device = resolve_device(cfg.profile.device)
        teacher, teacher_sha = load_teacher(cfg, data, device)
        return _ensure_features(cfg, data, teacher, teacher_sha, pdir, layers, device, rebuild_stale=False)


def select_from_quality(quality: pd.DataFrame, k: int, criterion: str) -> list[int]:
    """Top-k teacher layers by `criterion` (section 0 item 4), sorted by index."""
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown layer criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    return select_layers(dict(zip(quality["layer"].astype(int), quality[criterion].astype(float))), k)


# ----------------------------------------------------------------------------- steps


def _ensure_quality(cfg: Config, data: Data, teacher: torch.nn.Module, teacher_sha: str, pdir: Path, device: torch.device) -> pd.DataFrame:
    path = pdir / QUALITY
    if path.exists():
        quality = pd.read_csv(path)
        if _sidecar(pdir).get("teacher_sha256") == teacher_sha:
            log.info("profile: %s is up to date, skipping extraction and Q", path)
            return quality
        log.info("profile: %s belongs to another teacher checkpoint, recomputing", path)
    table = list_layers(cfg, data)
    pool = data.train_indices
    subset_a, subset_b = draw_subsets(
        data.train.labels[pool], data.num_classes, subset_size=cfg.profile.subset_size, per_class_cap=cfg.profile.per_class_cap, seed=cfg.profile.seed
    )
    subset_a, subset_b = pool[subset_a], pool[subset_b]
    union = torch.unique(torch.cat([subset_a, subset_b]))  # sorted positions in the training split
    layers = table["layer"].tolist()
    acts_path = pdir / ACTIVATIONS
    meta = {
        **cache_identity(teacher_sha, data),
        "positions": "q-subsets",
        "profile": artifacts.profile_key(cfg),
        "layers": layers,
        "dtype": "float32",
        "code_version": code_version(),
    }
    if not _valid(acts_path, meta):
        tic = time.perf_counter()
        all_shapes = layer_shapes(cfg, data)
        shapes = {layer_name(i): all_shapes[i] for i in layers}
        shapes["positions"] = ()
        write_h5(
            acts_path,
            meta,
            len(union),
            shapes,
            {**{n: "float32" for n in shapes}, "positions": "int64"},
            _extract_batches(teacher, data, union, layers, cfg.profile.batch_size, device, logits=False, dtype=torch.float32, with_positions=True),
            progress=cfg.profile.progress,
        )
        log.info(
            "profile: extracted %d layers for %d Q-subset images in %.1fs (peak RSS so far %.0f MiB) -> %s",
            len(layers), len(union), time.perf_counter() - tic, peak_rss_mb(), acts_path,
        )
    # Row of each subset member inside the union (both sorted, so searchsorted finds them).
    rows_a, rows_b = torch.searchsorted(union, subset_a), torch.searchsorted(union, subset_b)
    ya, yb = data.train.labels[subset_a], data.train.labels[subset_b]
    n_train = len(data.train.labels)  # METHOD 6.5: the full training-set size in K
    records = []
    tic = time.perf_counter()
    with FeatureCache(acts_path) as acts:
        for i in layers:
            x = acts.gather(layer_name(i), torch.arange(acts.n))
            stats = layer_stats(x[rows_a], ya, x[rows_b], yb, n_train, device=device)
            records.append(stats)
            log.info("profile: layer %2d  S %.4f  I %.4f  E %.4f  Q %.4f", i, stats["S"], stats["I"], stats["E"], stats["Q"])
    log.info("profile: S/I/E/Q of %d layers in %.1fs (peak RSS so far %.0f MiB)", len(layers), time.perf_counter() - tic, peak_rss_mb())
    stats_df = pd.DataFrame(records)
    quality = pd.concat([table.drop(columns=["bytes_per_sample"]), stats_df], axis=1)
    quality["selected"] = False
    atomic_write(path, lambda tmp: quality.to_csv(tmp, index=False))
    atomic_write_yaml(pdir / "quality.meta.yaml", {"teacher_sha256": teacher_sha, "n_subset_a": len(subset_a), "n_subset_b": len(subset_b)})
    return quality


def _ensure_selection(cfg: Config, quality: pd.DataFrame, pdir: Path) -> list[int]:
    n_layers = len(quality)
    if cfg.profile.layers:
        selected = sorted(resolve_layers(cfg.profile.layers, n_layers, "profile.layers entry"))
        how = "explicit"
    else:
        selected = select_from_quality(quality, cfg.profile.k, cfg.profile.criterion)
        how = f"top-{cfg.profile.k} by {cfg.profile.criterion}"
    marked = quality["layer"].isin(selected)
    previous = _read_yaml(pdir / SELECTION)
    if previous.get("layers") == selected and bool((quality["selected"] == marked).all()) and (pdir / "quality.png").exists():
        log.info("profile: selection %s (%s) is up to date", selected, how)
        return selected
    quality["selected"] = marked
    atomic_write(pdir / QUALITY, lambda tmp: quality.to_csv(tmp, index=False))
    atomic_write_yaml(
        pdir / SELECTION,
        {"criterion": cfg.profile.criterion, "k": cfg.profile.k, "how": how, "layers": selected,
         "baseline_layers": list(MODELS.get(cfg.teacher.name).baseline_layers)},
    )
    plot_quality(quality, selected, pdir / "quality.png", title=f"{cfg.teacher.name} on {cfg.dataset.name}")
    log.info("profile: selected teacher layers %s (%s)", selected, how)
    return selected


def _ensure_features(
    cfg: Config,
    data: Data,
    teacher: torch.nn.Module,
    teacher_sha: str,
    pdir: Path,
    layers: list[int],
    device: torch.device,
    rebuild_stale: bool = True,
) -> Path:
    path = pdir / FEATURES
    base_meta = {
        **cache_identity(teacher_sha, data),
        "positions": "all",
        "dtype": cfg.profile.cache_dtype,
    }
    have: list[int] = []
    if path.exists():
        try:
            with FeatureCache(path, rebuild_hint=_rebuild_hint(cfg)) as cache:
                cache.check(base_meta, rebuild_hint=_rebuild_hint(cfg))
                have = list(cache.meta.get("layers", []))
        except CacheError as exc:
            if not rebuild_stale:
                raise
            log.info("profile: %s is not usable (%s); rebuilding it", path, exc)
            have = []
    missing = sorted(set(layers) - set(have))
    if not missing and path.exists():
        log.info("profile: %s already holds layers %s, skipping", path, sorted(set(layers)))
        return path
    if cfg.profile.cache_dtype not in ("float16", "float32"):
        raise ConfigError(f"profile.cache_dtype must be float16 or float32, not '{cfg.profile.cache_dtype}'")
    all_shapes = layer_shapes(cfg, data)
    shapes = {layer_name(i): all_shapes[i] for i in missing}
    dtypes = {n: cfg.profile.cache_dtype for n in shapes}
    all_layers = sorted(set(have) | set(missing))
    new_meta = {
        **base_meta,
        "layers": all_layers,
        "shapes": {str(i): list(all_shapes[i]) for i in all_layers},
        "preprocessing": {"mean": data.mean.tolist(), "std": data.std.tolist(), "image_size": data.image_size},
        "sample_order": "training split, original order",
        "code_version": code_version(),
    }
    with_logits = not have  # logits and labels are written with the first build and copied after
    if with_logits:
        shapes.update(logits=(data.num_classes,), labels=())
        dtypes.update(logits="float32", labels="int64")
    tic = time.perf_counter()
    everything = torch.arange(len(data.train.labels))
    write_h5(
        path,
        new_meta,
        len(everything),
        shapes,
        dtypes,
        _extract_batches(teacher, data, everything, missing, cfg.profile.batch_size, device, logits=with_logits, dtype=torch.float32),
        copy_from=path if have else None,
        progress=cfg.profile.progress,
    )
    log.info(
        "profile: wrote layers %s for %d images in %.1fs (peak RSS so far %.0f MiB) -> %s",
        missing, len(everything), time.perf_counter() - tic, peak_rss_mb(), path,
    )
    return path


def _extract_batches(
    teacher: torch.nn.Module, data: Data, positions: torch.Tensor, layers: list[int], batch_size: int, device: torch.device, *, logits: bool, dtype: torch.dtype, with_positions: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream teacher outputs (eval mode, no augmentation, METHOD 6.1) batch by batch to the CPU."""
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            idx = positions[start : start + batch_size]
            x = data.normalize(data.train.images[idx], device)
            if logits:
                out, feats = forward_with_features(teacher, x, layers)
            else:  # stops after the deepest requested layer
                feats = extract(teacher, x, layers)
            batch = {layer_name(i): f.to("cpu", dtype) for i, f in feats.items()}
            if logits:
                batch["logits"] = out.float().cpu()
                batch["labels"] = data.train.labels[idx]
            if with_positions:
                batch["positions"] = idx
            yield batch


def _valid(path: Path, meta: dict) -> bool:
    if not path.exists():
        return False
    try:
        with FeatureCache(path) as cache:
            cache.check(meta, rebuild_hint="it is rebuilt now")
        return True
    except CacheError as exc:
        log.info("profile: %s will be rebuilt (%s)", path, exc)
        return False


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _sidecar(pdir: Path) -> dict:
    return _read_yaml(pdir / "quality.meta.yaml")


def _rebuild_hint(cfg: Config) -> str:
    return f"rebuild it with: make profile DATASET={cfg.dataset.name} TEACHER={cfg.teacher.name}"
