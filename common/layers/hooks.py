"""Generalized layers (METHOD 4): linearise a model, find its layer boundaries, capture outputs.

A model is flattened into a list of modules in registration order (METHOD 4.1, rule 1); the
i-th *boundary* module in that list is generalized layer i and its feature is that module's
output. Features are taken with forward hooks on the named modules (METHOD section 0 item 5),
never by re-threading `forward()`.

Every model in `common.models` is *sequential*: running its linearised module list in order
equals `model(x)`. That is what lets `modules_after` continue a forward from any layer (SimKD's
reused teacher head) without per-model code.

A torchvision or timm model (`tv:` / `timm:` names) is not built that way; it carries a
`LayerChain` instead (`common.models.tracing`), an explicit module list that replays its forward
and names its generalized layers and head, and every function below reads that list when present.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from common.errors import ConfigError

# Boundary module types (METHOD 4.1 rule 2). Blocks are matched by class name so that the
# torchvision classes of the same name count too.
BOUNDARY_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Flatten)
BOUNDARY_CLASS_NAMES = frozenset({"BasicBlock", "Bottleneck", "InvertedResidual", "InvertedBlock", "EncoderBlock"})


def is_boundary(module: nn.Module) -> bool:
    """True for modules that end a generalized layer (METHOD 4.1 rule 2)."""
    return (
        isinstance(module, BOUNDARY_TYPES)
        or type(module).__name__ in BOUNDARY_CLASS_NAMES
        or bool(getattr(module, "is_generalized_layer", False))
    )


def _is_library_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] in ("torch", "torchvision")


@dataclass(frozen=True)
class LayerChain:
    """An explicit linearisation, for models whose forward is not their children in order.

    Running `items` in order on the model's input gives its logits; `boundaries` are the positions
    of the generalized layers in `items` (in order), `head` the position where the head starts
    (METHOD 4.1 rule 5). Each boundary item is a module the model's own forward calls exactly
    once, so hooks on it see the feature during `model(x)`. Kept as the plain attribute
    `model.layer_chain` (not a submodule: state dicts are the library's own), and deep-copied
    with the model.
    """

    items: tuple[tuple[str, nn.Module], ...]
    boundaries: tuple[int, ...]
    head: int


def layer_chain(model: nn.Module) -> LayerChain | None:
    chain = getattr(model, "layer_chain", None)
    return chain if isinstance(chain, LayerChain) else None


def linearize(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules as a flat list of (path, module), METHOD 4.1 rule 1.

    Sequential/ModuleList are expanded; user-defined modules with children are expanded unless
    they are boundaries; torch/torchvision modules and leaves are kept whole. A model with a
    `LayerChain` gives its chain's items.
    """
    chain = layer_chain(model)
    if chain is not None:
        return list(chain.items)
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                visit(path, child)
            elif is_boundary(child) or _is_library_module(child) or not any(True for _ in child.children()):
                out.append((path, child))
            else:
                visit(path, child)

    visit("", model)
    return out


@dataclass(frozen=True)
class GenLayer:
    index: int  # generalized-layer index (0-based)
    path: str  # module path, as in model.named_modules()
    position: int  # position in the linearised module list
    module: nn.Module


def generalized_layers(model: nn.Module) -> list[GenLayer]:
    """All generalized layers of `model`, in order (METHOD 4.1 rule 4)."""
    chain = layer_chain(model)
    if chain is not None:
        return [GenLayer(i, chain.items[p][0], p, chain.items[p][1]) for i, p in enumerate(chain.boundaries)]
    layers = []
    for position, (path, module) in enumerate(linearize(model)):
        if is_boundary(module):
            layers.append(GenLayer(len(layers), path, position, module))
    return layers


def resolve_layers(indices: Iterable[int], n_layers: int, what: str = "layer") -> list[int]:
    """Normalise indices (negative counts from the end, METHOD 4.1 rule 6) and range-check them."""
    out = []
    for i in indices:
        if not -n_layers <= int(i) < n_layers:
            raise ConfigError(
                f"{what} {i} is out of range: the model has {n_layers} generalized layers "
                f"(0..{n_layers - 1}); list them with: python stage1_profile_teacher.py --list-layers"
            )
        out.append(int(i) % n_layers)
    return out


def head_position(model: nn.Module) -> int:
    """Position in the linearised list of the first nn.Linear: the start of the head (METHOD 4.1 rule 5).
    A `LayerChain` names it (the item holding the library's classifier)."""
    chain = layer_chain(model)
    if chain is not None:
        return chain.head
    for position, (_, module) in enumerate(linearize(model)):
        if isinstance(module, nn.Linear):
            return position
    raise ValueError(f"{type(model).__name__} has no nn.Linear head")


def backbone_and_head_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameter groups `backbone` (before the first Linear) and `classification_head` (METHOD 5)."""
    start = head_position(model)
    head_ids = {id(p) for _, m in linearize(model)[start:] for p in m.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    return backbone, head


def modules_after(model: nn.Module, layer: int) -> nn.Sequential:
    """The modules that follow generalized layer `layer`, as one Sequential (shares parameters)."""
    gen = generalized_layers(model)
    (layer,) = resolve_layers([layer], len(gen))
    return nn.Sequential(*[m for _, m in linearize(model)[gen[layer].position + 1 :]])


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[int],
    *,
    detach_after: int | None = None,
    stop_after_last: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of generalized `layers` during forwards run inside the block.

    detach_after: the output of that layer is recorded as is but handed *detached* to the rest of
        the network, so a loss on the logits cannot reach anything up to that layer (METHOD 8.1,
        "SeperateLinear").
    stop_after_last: abort the forward right after the deepest requested layer (use `extract`).

    The dict maps layer index -> tensor. Each tensor is the module's output object; models here
    never modify a boundary output in place, so the recorded value stays what the layer produced.
    """
    gen = generalized_layers(model)
    wanted = resolve_layers(layers, len(gen))
    if detach_after is not None:
        (detach_after,) = resolve_layers([detach_after], len(gen))
    deepest = max(wanted) if wanted else -1
    features: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor):
            if index in wanted:
                features[index] = output
            if stop_after_last and index == deepest:
                raise _StopForward
            if index == detach_after:
                return output.detach()
            return None

        return hook

    for index in sorted(set(wanted) | ({detach_after} if detach_after is not None else set())):
        handles.append(gen[index].module.register_forward_hook(make_hook(index)))
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def extract(model: nn.Module, x: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Outputs of `layers` for input `x`, stopping the forward after the deepest one (no grad)."""
    with capture(model, layers, stop_after_last=True) as features:
        try:
            model(x)
        except _StopForward:
            pass
    return dict(features)


def forward_with_features(
    model: nn.Module, x: torch.Tensor, layers: Sequence[int], detach_after: int | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Full forward returning (logits, {layer: feature}); see `capture` for `detach_after`."""
    with capture(model, layers, detach_after=detach_after) as features:
        logits = model(x)
    return logits, dict(features)


@dataclass(frozen=True)
class LayerInfo:
    index: int
    path: str
    kind: str  # module class name
    shape: tuple[int, ...]  # per-sample output shape
    dim: int  # flattened dimension D (METHOD 6.3)
    bytes_per_sample: int  # float32


@torch.no_grad()
def layer_infos(model: nn.Module, input_shape: Sequence[int]) -> list[LayerInfo]:
    """Index, path, output shape and size of every generalized layer, from one dummy forward."""
    gen = generalized_layers(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(2, *input_shape, device=device)
        features = extract(model, x, [g.index for g in gen])
    finally:
        model.train(was_training)
    table = []
    for g in gen:
        shape = tuple(features[g.index].shape[1:])
        dim = int(torch.Size(shape).numel())
        table.append(LayerInfo(g.index, g.path, type(g.module).__name__, shape, dim, 4 * dim))
    return table
