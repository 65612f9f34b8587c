"""S, I, E, Q of any model's generalized layers, from Python: the layer selection for people who keep
their own training code (mdistiller, torchdistill, timm).

    from lfkd.quality import quality_table          # `common.quality` inside this repository
    table = quality_table(model, images, labels, num_classes=100)
    table[table.selected]                            # the top-k by Q, with each layer's module path

It is stage 1's S/I/E/Q step without the config and the artifacts: the same subsets
(`formulas.draw_subsets`), the same streaming (`stream.stream_layer_stats`, memory bounded by
`memory_budget_mb` as `profile.memory_budget_mb` bounds stage 1's) and the same top-k, so the table
equals stage 1's quality.csv on the same images (a test). What it holds besides that budget: one
batch of the model's forward, and the images the caller passes (a DataLoader's dataset is read
item by item instead).

Also the selection's one home for stage 1 (`top_k_by_criterion`, `undefined_criteria`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from common.config import CRITERIA, ProfileConfig
from common.errors import ConfigError, DataError
from common.layers.hooks import extract, layer_chain, layer_infos
from common.quality.formulas import draw_subsets, select_layers
from common.quality.stream import stream_layer_stats

_DEFAULTS = ProfileConfig()


def quality_table(
    model: nn.Module,
    images: Tensor | DataLoader,
    labels: Tensor | Sequence[int] | None = None,
    *,
    num_classes: int,
    k: int = _DEFAULTS.k,
    criterion: str = _DEFAULTS.criterion,
    subset_size: int = _DEFAULTS.subset_size,
    per_class_cap: int = _DEFAULTS.per_class_cap,
    seed: int = _DEFAULTS.seed,
    n_train: int | None = None,
    batch_size: int = _DEFAULTS.batch_size,
    memory_budget_mb: int = _DEFAULTS.memory_budget_mb,
) -> pd.DataFrame:
    """The S/I/E/Q table of `model`'s generalized layers (METHOD 4, 6) on labelled training images.

    model: the trained teacher, on the device to compute on (it is used in eval mode and left in
        the mode it had). Generalized layers are found as the project finds them: the model's
        `layer_chain` (models from `create_model`), a traced chain for a torchvision or timm model
        (as `tv:<name>` / `timm:<name>`), else the boundary modules of METHOD 4.1.
    images: a tensor [N, C, H, W] as the model takes it (normalised), or a DataLoader over a
        map-style dataset whose items are (image, label): its dataset is read by index (its
        sampler, shuffling and workers are not used).
    labels: the N class labels in [0, num_classes); for a DataLoader optional (without them one
        pass over the dataset reads them).
    num_classes, k, criterion, subset_size, per_class_cap, seed, batch_size, memory_budget_mb: as
        the `profile.*` keys of the same names (docs/usage.md).
    n_train: the training-set size in E's K (METHOD 6.5); default the number of images given.

    Returns one row per layer: layer, module (its path in `model.named_modules()`), kind, shape,
    dim, S, I, E, sqrtIE, Q and the intermediate statistics, `selected` (the top-k by
    `criterion`) and `undefined` (criteria that are NaN there); `table.attrs["top_k"]` holds the
    top-k by every criterion, as profile.yaml does.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion is '{criterion}'; choose one of {', '.join(CRITERIA)}")
    source, all_labels, sample = _source(images, labels)
    device = _device_of(model)
    with _layers_of(model, sample.to(device)), _eval(model):
        infos = layer_infos(model, tuple(sample.shape[1:]))
        if not infos:
            raise ConfigError(f"{type(model).__name__} has no generalized layers (METHOD 4.1): no ReLU, residual or transformer block was found")
        subset_a, subset_b = draw_subsets(all_labels, num_classes, subset_size=subset_size, per_class_cap=per_class_cap, seed=seed)

        @torch.no_grad()
        def features(positions: Tensor, layers: list[int]) -> dict[int, Tensor]:
            return {i: f.float() for i, f in extract(model, source(positions).to(device), layers).items()}

        records = stream_layer_stats(
            features, {t.index: t.shape for t in infos},
            subset_a, all_labels[subset_a], subset_b, all_labels[subset_b], n_train or len(all_labels),
            device=device, budget_bytes=memory_budget_mb << 20, batch_size=batch_size,
        )
    stats = pd.concat([
        pd.DataFrame({"layer": t.index, "module": t.path, "kind": t.kind, "shape": "x".join(map(str, t.shape)), "dim": t.dim} for t in infos),
        pd.DataFrame([records[t.index] for t in infos]),
    ], axis=1)
    top_k = top_k_by_criterion(stats, k)
    if top_k[criterion] is None:
        select_layers(dict(zip(stats["layer"], stats[criterion].astype(float))), k)  # raises, naming why
    stats["selected"] = stats["layer"].isin(top_k[criterion])
    stats["undefined"] = undefined_criteria(stats)
    stats.attrs["top_k"] = top_k
    return stats


def top_k_by_criterion(stats: pd.DataFrame, k: int) -> dict[str, Any]:
    """{"k": k, criterion: the top-k layers by it, or None where fewer than k are finite} for
    every criterion (the paper's ablations; profile.yaml's `top_k`)."""
    top_k: dict[str, Any] = {"k": k}
    for name in CRITERIA:
        try:
            top_k[name] = select_layers(dict(zip(stats["layer"].astype(int), stats[name].astype(float))), k)
        except (ConfigError, DataError):  # too few finite scores for this criterion
            top_k[name] = None
    return top_k


def undefined_criteria(stats: pd.DataFrame) -> list[str]:
    """Per layer, the criteria that are NaN or infinite there ("S I Q"; "" when all are defined):
    quality.csv's marker for the scores `select_layers` skips."""
    bad = ~stats[list(CRITERIA)].astype(float).abs().lt(float("inf"))  # NaN < inf is False too
    return [" ".join(c for c in CRITERIA if row[c]) for _, row in bad.iterrows()]


def _source(images: Tensor | DataLoader, labels: Tensor | Sequence[int] | None) -> tuple[Any, Tensor, Tensor]:
    """(positions -> image batch, every label, a 2-image sample for the layer table)."""
    if isinstance(images, DataLoader):
        dataset = images.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise ConfigError("quality_table needs a DataLoader over a map-style dataset (items by index); pass tensors instead")
        collate = images.collate_fn

        def batch(positions: Tensor) -> Tensor:
            return _images_of(collate([dataset[int(i)] for i in positions]))

        if labels is None:
            labels = torch.cat([_labels_of(collate([dataset[i] for i in range(j, min(j + 256, len(dataset)))]))
                                for j in range(0, len(dataset), 256)])
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(labels) != len(dataset):
            raise DataError(f"{len(labels)} labels for a dataset of {len(dataset)} items; pass one label per item")
        return batch, labels, batch(torch.arange(min(2, len(dataset))))
    if not isinstance(images, Tensor) or images.dim() < 2:
        raise ConfigError("images must be a tensor [N, C, H, W] (as the model takes it) or a DataLoader")
    if labels is None:
        raise ConfigError("labels are needed with an images tensor: pass one class label per image")
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if len(labels) != len(images):
        raise DataError(f"{len(labels)} labels for {len(images)} images; pass one label per image")
    return (lambda positions: images[positions.to(images.device)]), labels, images[:2]


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor):
        return batch[0]
    raise ConfigError("the DataLoader's dataset must give (image, label) items, as torchvision datasets do")


def _labels_of(batch: Any) -> Tensor:
    _images_of(batch)
    return torch.as_tensor(batch[1]).reshape(-1)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _layers_of(model: nn.Module, sample: Tensor) -> Iterator[None]:
    """A torchvision or timm model built by the user has no `layer_chain`: trace one for the call
    (as `create_model` does for `tv:` / `timm:` names) and remove it afterwards, so the caller's
    model is left as it was."""
    library = type(model).__module__.split(".")[0]
    if layer_chain(model) is not None or library not in ("torchvision", "timm"):
        yield
        return
    from common.models.external import classifier_of
    from common.models.tracing import build_chain

    with torch.no_grad(), _eval(model):
        model.layer_chain = build_chain(model, sample, classifier_of(model), type(model).__name__)
    try:
        yield
    finally:
        del model.layer_chain
