"""Stage 1's feature-cache step: <teacher dir>/features-<dtype>.h5, the teacher's outputs for the
students' training rows, built, extended and checked here (the file format is common/cache/reader.py's)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from common.artifacts import layout as artifacts
from common.cache.reader import POSITIONS, FeatureCache, layer_name, storage_order
from common.cache.write import write_h5
from common.config import Config
from common.data.registry import Data
from common.errors import CacheError
from common.runtime import code_version, peak_rss_mb
from common.files import file_lock
from common.layers.tables import layer_shapes
from common.layers.hooks import extract, forward_with_features
from common.profile.teacher import checkpoint_sha, load_teacher
from common.runtime import resolve_device

log = logging.getLogger("kd")


def features_path(cfg: Config, data: Data) -> Path:
    """The teacher's feature cache for profile.cache_dtype: one file per teacher and dtype, which
    grows when a run needs more layers or rows."""
    return artifacts.teacher_dir(cfg, data) / f"features-{cfg.profile.cache_dtype}.h5"


def rebuild_hint(cfg: Config) -> str:
    """The command a stale cache or profile error names: stage 1 rebuilds both."""
    return f"rebuild it with: make profile DATASET={cfg.dataset.name} TEACHER={cfg.teacher.name}"


def cache_identity(teacher_sha: str, data: Data) -> dict[str, str]:
    """What makes cached teacher outputs valid: the checkpoint, the data (with preprocessing), the split."""
    return {"teacher_sha256": teacher_sha, "dataset": data.fingerprint, "split": "train"}


def wants_cache(cfg: Config, data: Data) -> bool:
    """Whether the students read the teacher from the cache (train.teacher_source; auto: unless
    augmentation makes cached features stale, or the dataset is streamed: at ImageNet scale the
    cache of one layer set is terabytes, so it is written only when asked for)."""
    return no_cache_reason(cfg, data) is None


def no_cache_reason(cfg: Config, data: Data) -> str | None:
    """Why the students use the live teacher instead of the cache (the setting that decided it,
    for stage 1's log line), or None when they read the cache."""
    source = cfg.train.teacher_source
    if source == "cache":
        return None
    if source == "live":
        return "train.teacher_source=live"
    if cfg.train.augment:
        return "train.augment=true: each epoch draws other crops, so cached features would be stale"
    if data.streamed:
        return f"{data.name} is streamed: a cache of its training split would take terabytes at ImageNet scale"
    return None


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
    return ensure_features_with(cfg, data, teacher, teacher_sha, layers, rows, device, rebuild_stale=False)


def ensure_features_with(
    cfg: Config,
    data: Data,
    teacher: torch.nn.Module,
    teacher_sha: str,
    layers: list[int],
    rows: torch.Tensor,
    device: torch.device,
    rebuild_stale: bool = True,
) -> Path:
    """features-<dtype>.h5 with at least `layers` for training positions `rows`, computed by the
    loaded `teacher` where missing (stage 1's step; `ensure_features` loads the teacher first).

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
        _log_size(path, positions, shapes, dtypes)
        tic = time.perf_counter()
        write_h5(
            path,
            meta,
            len(positions),
            shapes,
            dtypes,
            extract_batches(teacher, data, positions, missing, cfg.profile.batch_size, device, logits=with_logits,
                            dtype=torch.float32, with_positions=with_logits),
            copy_from=path if extend_only else None,
            progress=cfg.profile.progress,
            log_interval_s=cfg.profile.log_interval_s,
        )
        log.info(
            "profile: wrote layers %s for %d training images in %.1fs (peak RSS so far %.0f MiB) -> %s",
            missing, len(positions), time.perf_counter() - tic, peak_rss_mb(), path,
        )
    return path


def extract_batches(
    teacher: torch.nn.Module, data: Data, positions: torch.Tensor, layers: list[int], batch_size: int, device: torch.device, *, logits: bool, dtype: torch.dtype, with_positions: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream teacher outputs (eval mode, no augmentation, METHOD 6.1) batch by batch to the CPU,
    named as the cache stores them (`write_h5`'s batches).

    On CUDA the rows go into pinned host buffers (new ones each batch: the writer may still hold
    the last ones) by non-blocking copies, and a batch is handed on only when its copies are done,
    one batch later: its copy overlaps the next batch's forward. On the CPU the rows are handed on
    as they come, converted as before; either way the bytes are those of a plain copy.
    """
    cuda = device.type == "cuda"
    waiting: tuple[dict[str, torch.Tensor], torch.cuda.Event] | None = None
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            idx = positions[start : start + batch_size]
            x = data.normalize(data.train.images[idx], device)
            if logits:
                out, feats = forward_with_features(teacher, x, layers)
            else:  # stops after the deepest requested layer
                feats = extract(teacher, x, layers)
            batch = {layer_name(i): _to_host(f, dtype, cuda) for i, f in feats.items()}
            if logits:
                batch["logits"] = _to_host(out, torch.float32, cuda)
                batch["labels"] = data.train.labels[idx]
            if with_positions:
                batch[POSITIONS] = idx
            if not cuda:
                yield batch
                continue
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
            if waiting is not None:
                waiting[1].synchronize()  # the previous batch's copies, queued before this forward
                yield waiting[0]
            waiting = (batch, copied)
    if waiting is not None:
        waiting[1].synchronize()
        yield waiting[0]


def _to_host(rows: torch.Tensor, dtype: torch.dtype, cuda: bool) -> torch.Tensor:
    """`rows` as `dtype` on the host: on CUDA into a pinned buffer by a non-blocking copy (read it
    only after the stream has passed the copy), elsewhere the plain conversion."""
    if not cuda:
        return rows.to("cpu", dtype)
    host = torch.empty(rows.shape, dtype=dtype, pin_memory=True)
    host.copy_(rows.to(dtype), non_blocking=True)  # converted on the device, as `.to("cpu", dtype)` rounds
    return host


def _log_size(path: Path, positions: torch.Tensor, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
    """State what the cache will take before a byte is written (issue 21: a cache of a streamed
    dataset is large, and the user asked for it)."""
    row = sum(math.prod(shape) * torch.empty((), dtype=getattr(torch, dtypes[n])).element_size() for n, shape in shapes.items())
    log.info("profile: writing %s: %d rows x %.1f kB = %.2f GB (%s)", path, len(positions), row / 1e3, row * len(positions) / 1e9, ", ".join(shapes))


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
