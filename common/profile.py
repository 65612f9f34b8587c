"""Stage 1: profile the teacher (METHOD 6, 7; section 0 items 2-4, 9) and hand over to stage 2.

Steps, each skipped when its artifact is already valid, each keyed by what it depends on:

    <teacher dir>/                          teacher.pt (common/teacher.py)
    <teacher dir>/quality-<qhash>/          layer_stats.csv: S, I, E, Q... of every generalized layer
                                            (keyed by the analysis pool and subsets only), and
                                            activations.h5 with subset A's features when
                                            profile.keep_activations is set
    <teacher dir>/profile-<phash>/          the selection (keyed by the subsets plus k, criterion
                                            and an explicit list): profile.yaml (the manifest
                                            stage 2 reads), quality.csv, quality.png, selection.yaml
    <teacher dir>/features-<dtype>.h5       teacher outputs for the students' training rows

1. train the teacher unless finished;
2. S, I, E, Q of every layer, streamed (common/quality_stream.py): no layer of the analysis
   pool is ever held whole or written to disk; memory is bounded by profile.memory_budget_mb;
3. top-k by every criterion, the configured selection, the manifest;
4. the selected and baseline layers plus the logits for the rows of the students' training
   subset (train.train_subset) -> features-<dtype>.h5; a later run that needs more rows or
   layers extends it (`ensure_features`).

Stage 2 never re-derives any of this: it reads profile.yaml through `load_manifest` and turns a
method's layer word into indices with `Manifest.teacher_layers`.
"""
from __future__ import annotations

import functools
import shutil
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
import yaml

from common import artifacts, tracking
from common.cache import POSITIONS, FeatureCache, storage_order, write_h5
from common.config import CRITERIA, Config, to_dict, validate_config
from common.data import Data, load_data
from common.errors import CacheError, ConfigError, DataError
from common.io import atomic_write, atomic_write_text, atomic_write_yaml, code_version, file_lock, io_written_mb, peak_rss_mb, versions
from common.layers import LayerInfo, extract, forward_with_features, layer_table, resolve_layers
from common.models import MODELS, create_model
from common.quality import draw_subsets, select_layers
from common.quality_stream import stream_layer_stats
from common.plots import plot_quality
from common.teacher import checkpoint_sha, ensure_teacher, layer_name, load_teacher
from common.train import resolve_device

log = logging.getLogger("kd")

LAYER_STATS = "layer_stats.csv"
QUALITY = "quality.csv"
SELECTION = "selection.yaml"
MANIFEST = "profile.yaml"
ACTIVATIONS = "activations.h5"
# Version of what layer_stats.csv holds; a change in the statistics' code bumps it, so an old
# table is recomputed rather than trusted.
STATS_VERSION = 2


@dataclass(frozen=True)
class Manifest:
    """Stage 1's hand-over to stage 2, as written in profile.yaml."""

    dir: Path
    data: dict[str, Any]

    @property
    def selected(self) -> list[int]:
        return list(self.data["selection"]["layers"])

    @property
    def features(self) -> Path:
        return (self.dir / self.data["features"]["path"]).resolve()

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


@dataclass
class Profile:
    dir: Path
    quality: pd.DataFrame
    selected: list[int]
    features: Path
    manifest: Manifest


# ----------------------------------------------------------------------------- layers


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


def _teacher_layers(cfg: Config, data: Data) -> tuple[LayerInfo, ...]:
    """The teacher's generalized layers with their shapes, from one dummy forward of an untrained copy."""
    return _layer_table(cfg.teacher.name, cfg.teacher.width, data.num_classes, data.in_channels, data.image_size)


@functools.lru_cache(maxsize=16)
def _layer_table(name: str, width: float, num_classes: int, in_channels: int, image_size: int) -> tuple[LayerInfo, ...]:
    """Cached: a stage asks for the table several times (validation, S/I/E/Q, the cache, the
    manifest), and a full-width model costs a build and a forward each time. The build draws
    its random init from a forked RNG, so asking never changes a seeded run."""
    with torch.random.fork_rng(devices=[]):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
        return tuple(layer_table(model, (in_channels, image_size, image_size)))


def cache_identity(teacher_sha: str, data: Data) -> dict[str, str]:
    """What makes cached teacher outputs valid: the checkpoint, the data (with preprocessing), the split."""
    return {"teacher_sha256": teacher_sha, "dataset": data.fingerprint, "split": "train"}


# ----------------------------------------------------------------------------- entry points


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
    """Run every stage-1 step that is not already done; returns the profile."""
    validate_config(cfg)  # configs changed in code skip load_config's check
    MODELS.get(cfg.teacher.name)
    data = data if data is not None else load_data(cfg.dataset)
    validate(cfg, len(_teacher_layers(cfg, data)))
    tic = time.perf_counter()
    tdir = ensure_teacher(cfg, data)
    _step("teacher", tic)
    device = resolve_device(cfg.profile.device)
    teacher, teacher_sha = load_teacher(cfg, data, device)
    stats = _ensure_quality(cfg, data, teacher, teacher_sha, device)
    pdir = artifacts.profile_dir(cfg, data)
    with file_lock(pdir / ".lock"):
        if not (pdir / "config.yaml").exists():
            atomic_write_yaml(pdir / "config.yaml", {**to_dict(cfg), "run": {"kind": "profile", "versions": versions()}})
        quality, top_k, selected, how = _select(cfg, stats)
        previous = load_manifest(cfg, data)
        if previous is not None and previous.data["teacher"]["sha256"] == teacher_sha and previous.selected == selected:
            log.info("profile: selection %s (%s) is up to date", selected, how)
        else:
            _write_selection(cfg, pdir, quality, selected, how)
        needed = sorted(set(selected) | set(MODELS.get(cfg.teacher.name).baseline_layers))
        tic = time.perf_counter()
        rows = data.training_subset(cfg.train.train_subset, cfg.dataset.split_seed)
        features = _ensure_features(cfg, data, teacher, teacher_sha, needed, rows, device)
        _step("features", tic)
        manifest = _write_manifest(cfg, data, pdir, teacher_sha, quality, top_k, selected, how, features)
        (pdir / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return Profile(pdir, quality, selected, features, manifest)


def load_manifest(cfg: Config, data: Data) -> Manifest | None:
    """The finished profile's manifest for this config, or None when stage 1 has not run."""
    pdir = artifacts.profile_dir(cfg, data)
    path = pdir / MANIFEST
    if not (pdir / "done").exists() or not path.exists():
        return None
    try:
        return Manifest(pdir, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as exc:
        raise CacheError(f"{path} cannot be read ({type(exc).__name__}); delete it and rerun: {rebuild_hint(cfg)}") from None


def manifest_for(cfg: Config, data: Data) -> Manifest:
    """The profile manifest, running stage 1 first when it is missing."""
    manifest = load_manifest(cfg, data)
    return manifest if manifest is not None else run(cfg, data).manifest


def ensure_features(cfg: Config, data: Data, layers: list[int], rows: torch.Tensor) -> Path:
    """The feature cache holding at least `layers` for training positions `rows` (stage 2 calls
    this; extends the cache with missing layers or rows).

    A cache made from another teacher checkpoint or other data is refused, not rebuilt: the
    profile's layer selection is stale too, and stage 1 is the command that rebuilds both.
    """
    device = resolve_device(cfg.profile.device)
    path = features_path(cfg, data)
    if path.exists():  # the common case: nothing to add, no teacher to load
        with FeatureCache(path, rebuild_hint=rebuild_hint(cfg)) as cache:
            if set(cache.meta.get("layers", [])) >= set(layers) and cache.covers(rows):
                teacher_sha = checkpoint_sha(cfg, data)
                cache.check(_expected_meta(cfg, data, teacher_sha), rebuild_hint=rebuild_hint(cfg))
                _check_shapes(cache, cfg, data, layers, layer_shapes(cfg, data))
                return path  # the datasets' checksums are checked when stage 2 reads them
    teacher, teacher_sha = load_teacher(cfg, data, device)
    return _ensure_features(cfg, data, teacher, teacher_sha, layers, rows, device, rebuild_stale=False)


def features_path(cfg: Config, data: Data) -> Path:
    return artifacts.teacher_dir(cfg, data) / f"features-{cfg.profile.cache_dtype}.h5"


# ----------------------------------------------------------------------------- steps


def _step(name: str, tic: float) -> None:
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
    return data.training_subset(cfg.profile.pool_size, cfg.profile.seed)


def q_subsets(cfg: Config, data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded subsets A and B as sorted training-split positions (METHOD 6.2, section 0 item 2)."""
    pool = analysis_pool(cfg, data)
    a, b = draw_subsets(
        data.train.labels[pool], data.num_classes,
        subset_size=cfg.profile.subset_size, per_class_cap=cfg.profile.per_class_cap, seed=cfg.profile.seed,
    )
    return pool[a], pool[b]


def _ensure_quality(cfg: Config, data: Data, teacher: torch.nn.Module, teacher_sha: str, device: torch.device) -> pd.DataFrame:
    """layer_stats.csv: the layer table with S, I, E, Q and the intermediate statistics."""
    qdir = artifacts.quality_dir(cfg, data)
    path = qdir / LAYER_STATS
    with file_lock(qdir / ".lock"):
        meta = _read_yaml(qdir / "layer_stats.meta.yaml")
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

        def step_done() -> None:
            _step(next(steps), clock[0])
            clock[0] = time.perf_counter()

        records = stream_layer_stats(
            _teacher_features(teacher, data, device),
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
            qdir / "layer_stats.meta.yaml",
            {"teacher_sha256": teacher_sha, "stats_version": STATS_VERSION, "n_subset_a": len(subset_a), "n_subset_b": len(subset_b),
             "n_pool": len(analysis_pool(cfg, data)), "n_train": n_train},
        )
    return quality


def _teacher_features(teacher: torch.nn.Module, data: Data, device: torch.device):
    """FeatureSource for common.quality_stream: an eval-mode forward (no augmentation, METHOD
    6.1) of the training images at `positions`, stopped after the deepest requested layer."""

    @torch.no_grad()
    def features(positions: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        x = data.normalize(data.train.images[positions], device)
        return {i: f.float() for i, f in extract(teacher, x, layers).items()}

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
        _extract_batches(teacher, data, subset_a, layers, cfg.profile.batch_size, device, logits=False, dtype=torch.float32, with_positions=True),
        progress=cfg.profile.progress,
    )
    _step("activations", tic)


def _select(cfg: Config, stats: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any], list[int], str]:
    """Top-k by every criterion (the paper's ablations) and the configured selection (METHOD 0.4)."""
    k = cfg.profile.k
    top_k: dict[str, Any] = {"k": k}
    for criterion in CRITERIA:
        scores = dict(zip(stats["layer"].astype(int), stats[criterion].astype(float)))
        try:
            top_k[criterion] = select_layers(scores, k)
        except (ConfigError, DataError):  # too few finite scores for this criterion
            top_k[criterion] = None
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
    quality["undefined"] = _undefined(stats)
    for layer, names in zip(quality["layer"], quality["undefined"]):
        if names:
            log.info("profile: layer %d has no finite %s (zero or non-finite features); never selected by them", layer, names)
    return quality, top_k, selected, how


def _undefined(stats: pd.DataFrame) -> list[str]:
    """Per layer, the criteria that are NaN or infinite there ("S I Q"; "" when all are defined):
    quality.csv's marker for the scores `select_layers` skips."""
    bad = ~stats[list(CRITERIA)].astype(float).abs().lt(float("inf"))  # NaN < inf is False too
    return [" ".join(c for c in CRITERIA if row[c]) for _, row in bad.iterrows()]


def _write_selection(cfg: Config, pdir: Path, quality: pd.DataFrame, selected: list[int], how: str) -> None:
    """quality.csv, selection.yaml and quality.png, for people."""
    atomic_write(pdir / QUALITY, lambda tmp: quality.to_csv(tmp, index=False))
    atomic_write_yaml(
        pdir / SELECTION,
        {"criterion": cfg.profile.criterion, "k": cfg.profile.k, "how": how, "layers": selected,
         "baseline_layers": list(MODELS.get(cfg.teacher.name).baseline_layers)},
    )
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


def _write_manifest(
    cfg: Config, data: Data, pdir: Path, teacher_sha: str, quality: pd.DataFrame, top_k: dict[str, Any],
    selected: list[int], how: str, features: Path,
) -> Manifest:
    shapes = layer_shapes(cfg, data)
    columns = ["S", "I", "E", "Q", "sqrtIE"]
    layers = [
        {"index": int(row.layer), "module": str(row.module), "shape": list(shapes[int(row.layer)]), "dim": int(row.dim),
         **{c: float(getattr(row, c)) for c in columns}}
        for row in quality.itertuples()
    ]
    with FeatureCache(features) as cache:
        feature_info = {
            "path": f"../{features.name}", "dtype": cache.meta.get("dtype"), "layers": list(cache.meta.get("layers", [])),
            "rows": int(cache.n),
        }
    subset_meta = _read_yaml(artifacts.quality_dir(cfg, data) / "layer_stats.meta.yaml")
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


def _expected_meta(cfg: Config, data: Data, teacher_sha: str) -> dict[str, Any]:
    """The cache metadata a reader must find: checkpoint, data, split, dtype and preprocessing."""
    preprocessing = {"mean": data.mean.tolist(), "std": data.std.tolist(), "image_size": data.image_size}
    return {**cache_identity(teacher_sha, data), "dtype": cfg.profile.cache_dtype, "preprocessing": preprocessing}


def _check_shapes(cache: FeatureCache, cfg: Config, data: Data, layers: list[int], shapes: dict[int, tuple[int, ...]]) -> None:
    """Each cached layer's rows have the shape the teacher's layer gives (and logits one per class)."""
    expected = {layer_name(i): tuple(shapes[i]) for i in layers if i in shapes}
    if "logits" in cache.names:
        expected["logits"] = (data.num_classes,)
    for name, want in expected.items():
        have = cache.shape(name)
        if have != want:
            raise CacheError(
                f"{cache.path}: cache field '{name}' has rows of shape {'x'.join(map(str, have))}, the teacher "
                f"gives {'x'.join(map(str, want))}; {rebuild_hint(cfg)}"
            )


def _ensure_features(
    cfg: Config,
    data: Data,
    teacher: torch.nn.Module,
    teacher_sha: str,
    layers: list[int],
    rows: torch.Tensor,
    device: torch.device,
    rebuild_stale: bool = True,
) -> Path:
    """features-<dtype>.h5 with at least `layers` for training positions `rows`.

    Missing layers are added (the old datasets are copied, only the new ones computed); missing
    rows rebuild the file for the union of its rows and `rows`, so the cache only grows and a
    reader never gets a row it did not ask for. An existing file is checked whole first (meta,
    shapes, every dataset's checksum): stage 1 rebuilds a stale or corrupt one (`rebuild_stale`),
    stage 2 refuses it with the command that rebuilds it.
    """
    path = features_path(cfg, data)
    rows = torch.unique(rows.cpu().long())
    all_shapes = layer_shapes(cfg, data)
    with file_lock(path.with_name(path.name + ".lock")):
        have: list[int] = []
        positions = rows
        extend_only = False
        if path.exists():
            try:
                with FeatureCache(path, rebuild_hint=rebuild_hint(cfg)) as cache:
                    cache.check(_expected_meta(cfg, data, teacher_sha), rebuild_hint=rebuild_hint(cfg))
                    _check_shapes(cache, cfg, data, list(cache.meta.get("layers", [])), all_shapes)
                    cache.verify()  # silent corruption: a flipped byte no metadata check sees
                    have = list(cache.meta.get("layers", []))
                    cached = cache.positions if cache.positions is not None else torch.arange(cache.n)
                    extend_only = cache.covers(rows)
                    positions = cached if extend_only else torch.unique(torch.cat([cached, rows]))
            except CacheError as exc:
                if not rebuild_stale:
                    raise
                log.info("profile: %s is not usable (%s); rebuilding it", path, exc)
                have, positions, extend_only = [], rows, False
        missing = sorted(set(layers) - set(have)) if extend_only else sorted(set(layers) | set(have))
        if extend_only and not missing:
            log.info("profile: %s already holds layers %s for these rows, skipping", path, sorted(set(layers)))
            return path
        shapes = {layer_name(i): all_shapes[i] for i in missing}
        dtypes = {n: cfg.profile.cache_dtype for n in shapes}
        all_layers = sorted(set(have) | set(missing))
        meta = {
            **_expected_meta(cfg, data, teacher_sha),
            "layers": all_layers,
            "shapes": {str(i): list(all_shapes[i]) for i in all_layers},
            "sample_order": "seeded random order of training-split positions (dataset 'positions')",
            "code_version": code_version(),
        }
        with_logits = not extend_only  # logits, labels and positions come with every full build
        if with_logits:
            shapes.update(logits=(data.num_classes,), labels=(), **{POSITIONS: ()})
            dtypes.update(logits="float32", labels="int64", **{POSITIONS: "int64"})
        if not extend_only:  # a new file stores its rows shuffled (disk blocks then mix classes)
            positions = storage_order(positions)
        tic = time.perf_counter()
        write_h5(
            path,
            meta,
            len(positions),
            shapes,
            dtypes,
            _extract_batches(teacher, data, positions, missing, cfg.profile.batch_size, device, logits=with_logits,
                             dtype=torch.float32, with_positions=with_logits),
            copy_from=path if extend_only else None,
            progress=cfg.profile.progress,
        )
        log.info(
            "profile: wrote layers %s for %d training images in %.1fs (peak RSS so far %.0f MiB) -> %s",
            missing, len(positions), time.perf_counter() - tic, peak_rss_mb(), path,
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
                batch[POSITIONS] = idx
            yield batch


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def rebuild_hint(cfg: Config) -> str:
    return f"rebuild it with: make profile DATASET={cfg.dataset.name} TEACHER={cfg.teacher.name}"
