"""Stage 1's quality step (METHOD 6): the analysis pool and subsets A and B, S, I, E, Q of every
teacher layer streamed into <quality dir>/layer_stats.csv, and subset A's activations.h5 when
profile.keep_activations is set; plus the per-step cost line every stage-1 step logs."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from common.artifacts import layout as artifacts
from common.cache.reader import POSITIONS, layer_name
from common.cache.write import write_h5
from common.config import Config
from common.data.registry import Data
from common.files import atomic_write, atomic_write_yaml, file_lock
from common.runtime import IntervalLine, code_version, io_written_mb, peak_rss_mb
from common.layers.tables import layer_shapes, list_layers
from common.layers.hooks import extract
from common.profile.features import cache_identity, extract_batches
from common.quality.formulas import draw_subsets
from common.quality.stream import FeatureSource, stream_layer_stats

log = logging.getLogger("kd")

LAYER_STATS = "layer_stats.csv"
STATS_META = "layer_stats.meta.yaml"
ACTIVATIONS = "activations.h5"
# Version of what layer_stats.csv holds; a change in the statistics' code bumps it, so an old
# table is recomputed rather than trusted.
STATS_VERSION = 2


def log_step(name: str, tic: float) -> None:
    """One line per step with its cost (bench/bench_profile_scale.py parses it)."""
    log.info(
        "profile: step %s took %.1fs, peak RSS so far %.0f MiB, written so far %.0f MiB",
        name, time.perf_counter() - tic, peak_rss_mb(), io_written_mb(),
    )


def analysis_pool(cfg: Config, data: Data) -> torch.Tensor:
    """Training positions the Q subsets are drawn from (METHOD 6.1): all training images, or a
    seeded class-balanced `profile.pool_size` of them (the reference's Tiny ImageNet CNN teachers)."""
    if cfg.profile.pool_size is None:
        return data.train_indices
    return data.training_subset(cfg.profile.pool_size, cfg.profile.seed, "profile.pool_size")


def q_subsets(cfg: Config, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded subsets A and B as sorted training-split positions (METHOD 6.2, section 0 item 2)."""
    pool = analysis_pool(cfg, data)
    a, b = draw_subsets(
        data.train.labels[pool], data.num_classes,
        subset_size=cfg.profile.subset_size, per_class_cap=cfg.profile.per_class_cap, seed=cfg.profile.seed,
    )
    return pool[a], pool[b]


def stats_meta(cfg: Config, data: Data) -> dict[str, Any]:
    """layer_stats.meta.yaml of this config's quality directory ({} before the step has run): the
    checkpoint and statistics version the table was computed for, and the pool and subset sizes."""
    return _read_yaml(artifacts.quality_dir(cfg, data) / STATS_META)


def ensure_quality(cfg: Config, data: Data, teacher: torch.nn.Module, teacher_sha: str, device: torch.device,
                   qdir: Path | None = None) -> pd.DataFrame:
    """layer_stats.csv: the layer table with S, I, E, Q and the intermediate statistics.

    `teacher` is the model `cfg.teacher` describes; `qdir` (default: the teacher's quality
    directory) lets a CE student's checkpoint be profiled by this same code
    (common/profile/student.py)."""
    qdir = qdir if qdir is not None else artifacts.quality_dir(cfg, data)
    path = qdir / LAYER_STATS
    with file_lock(qdir / ".lock"):
        meta = _read_yaml(qdir / STATS_META)
        if path.exists() and meta.get("teacher_sha256") == teacher_sha and meta.get("stats_version") == STATS_VERSION:
            log.info("profile: %s is up to date, skipping S/I/E/Q", path)
            return pd.read_csv(path)
        table = list_layers(cfg, data)
        shapes = layer_shapes(cfg, data)
        subset_a, subset_b = q_subsets(cfg, data)
        if cfg.profile.keep_activations:
            _write_activations(cfg, data, teacher, teacher_sha, qdir, subset_a, list(shapes), device)
        labels = data.train.labels
        n_train = len(labels)  # METHOD 6.5: the full training-set size in K, even for a smaller pool
        steps = iter(["quality_subset_a", "quality_subset_b"])
        clock = [time.perf_counter()]

        def step_done(device_peak: int | None) -> None:
            name = next(steps)
            log_step(name, clock[0])
            if device_peak is not None:  # on CUDA: the allocator's own count (common/quality/stream.py)
                log.info(
                    "profile: step %s device peak %.0f MiB above its start, budget %d MiB (profile.memory_budget_mb; "
                    "the peak also holds one batch of the teacher's forward)", name, device_peak / 2**20, cfg.profile.memory_budget_mb,
                )
            clock[0] = time.perf_counter()

        records = stream_layer_stats(
            _teacher_features(teacher, data, device, cfg.profile.log_interval_s),
            shapes,
            subset_a, labels[subset_a], subset_b, labels[subset_b], n_train,
            device=device,
            budget_bytes=cfg.profile.memory_budget_mb << 20,
            batch_size=cfg.profile.batch_size,
            on_step=step_done,
        )
        for i, stats in records.items():
            log.info("profile: layer %2d  S %.4f  I %.4f  E %.4f  Q %.4f", i, stats["S"], stats["I"], stats["E"], stats["Q"])
        stats_df = pd.DataFrame([records[i] for i in table["layer"]])
        quality = pd.concat([table.drop(columns=["bytes_per_sample"]), stats_df], axis=1)
        atomic_write(path, lambda tmp: quality.to_csv(tmp, index=False))
        atomic_write_yaml(
            qdir / STATS_META,
            {"teacher_sha256": teacher_sha, "stats_version": STATS_VERSION, "n_subset_a": len(subset_a), "n_subset_b": len(subset_b),
             "n_pool": len(analysis_pool(cfg, data)), "n_train": n_train},
        )
    return quality


def _teacher_features(teacher: torch.nn.Module, data: Data, device: torch.device, log_interval_s: float = 0.0) -> FeatureSource:
    """FeatureSource for common.quality.stream: an eval-mode forward (no augmentation, METHOD
    6.1) of the training images at `positions`, stopped after the deepest requested layer.
    Where stderr is no terminal, a line every `log_interval_s` counts the images forwarded so far
    (the passes are planned inside the stream, so there is no total to give an ETA against)."""
    line = IntervalLine("profile S/I/E/Q", 0, log_interval_s, unit="img", what="images forwarded")
    forwarded = [0]  # images, over every pass

    @torch.no_grad()
    def features(positions: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        x = data.normalize(data.train.images[positions], device)
        out = {i: f.float() for i, f in extract(teacher, x, layers).items()}
        forwarded[0] += len(positions)
        line.step(forwarded[0], forwarded[0])
        return out

    return features


def _write_activations(
    cfg: Config, data: Data, teacher: torch.nn.Module, teacher_sha: str, qdir: Path, subset_a: torch.Tensor, layers: list[int], device: torch.device
) -> None:
    """Subset A's features of every layer, float32, for inspection (profile.keep_activations)."""
    tic = time.perf_counter()
    shapes = layer_shapes(cfg, data)
    names = {layer_name(i): shapes[i] for i in layers}
    write_h5(
        qdir / ACTIVATIONS,
        {**cache_identity(teacher_sha, data), "positions": "q-subset A", "layers": layers, "dtype": "float32", "code_version": code_version()},
        len(subset_a),
        {**names, POSITIONS: ()},
        {**{n: "float32" for n in names}, POSITIONS: "int64"},
        extract_batches(teacher, data, subset_a, layers, cfg.profile.batch_size, device, logits=False, dtype=torch.float32, with_positions=True),
        progress=cfg.profile.progress,
        log_interval_s=cfg.profile.log_interval_s,
    )
    log_step("activations", tic)


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
