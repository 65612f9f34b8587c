"""Generalized layers of a torchvision or timm model, found by tracing one forward (METHOD 4).

METHOD 4.1 walks a model whose forward is its children in order. Library models are not built
that way (a functional flatten, token pooling, the class token live in `forward()` code), so
their layers and split points come from one eval-mode forward with hooks on every module:

* generalized layers, in call order: the *stem* (the last module before the first block whose
  output is exactly what the first block receives, looking through Identity/Dropout; absent
  when that tensor comes from forward code, as in ViTs) and every *block*: the outermost modules
  whose class name says residual / inverted-residual / transformer block (`BLOCK_NAME`: BasicBlock,
  Bottleneck, InvertedResidual, MBConv, CNBlock, ConvNeXtBlock, EncoderBlock, timm's ViT `Block`,
  ...). Failing those, timm's `feature_info` stages; failing those, METHOD 4.1's activations
  before the first Linear (torchvision VGG, AlexNet), both without a separate stem.
  A layer's feature is its module's output (METHOD 4.1 rule 4): post-residual for every block,
  (B, N, C) tokens for transformer blocks.
* the chain (`common.layers.hooks.LayerChain`): the calls between consecutive layers and after the
  last one (downsampling between stages, final norm, pooling, classifier), linked by data flow,
  with the parameter-free steps forward code takes between them (`Glue`: flatten, class-token or
  mean pooling) recognised by value. The calls before the first layer are one `RunUntil` item.
* the head: from the chain item holding the classifier (timm's `get_classifier()`, else the last
  Linear called), so pooling + classifier follow the last block and `detach_after` cuts cleanly.

The chain is checked by replaying it on the traced input; a model it does not reproduce is
refused with a ConfigError, never used with a wrong split.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.layers.hooks import LayerChain

# Outermost modules whose class name matches are blocks (torchvision and timm spellings alike:
# FusedMBConv, _InvertedResidual, EdgeResidual, UniversalInvertedResidual, ResBottleneckBlock, ...).
BLOCK_NAME = re.compile(r"(Block|Bottleneck|Residual|MBConv|DepthwiseSeparableConv)(V\d+)?$")
# Blocks that hand on (B, H, W, C) maps, which the projectors would read as (C, H, W).
CHANNELS_LAST_BLOCKS = frozenset({"SwinTransformerBlock", "SwinTransformerBlockV2", "SwinTransformerV2Block"})
# METHOD 4.1 rule 2, the fallback for models without named blocks (torchvision VGG, AlexNet).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
# Modules that hand their input on unchanged in eval mode: looked through when finding the stem.
PASS_THROUGH = (nn.Identity, nn.Dropout)


@dataclass
class Call:
    """One module call of the traced forward; `start`/`end` order calls and nest them."""

    path: str
    module: nn.Module
    start: int
    end: int = -1
    input: Any = None  # first positional argument
    output: Any = None
    output_version: int = -1  # the output's in-place version counter when the call returned


def trace(model: nn.Module, x: torch.Tensor) -> tuple[list[Call], torch.Tensor]:
    """Every module call of `model(x)` (eval mode, no grad), in start order, and the output."""
    calls: list[Call] = []
    open_calls: dict[int, list[Call]] = {}
    counter = itertools.count()

    def pre_hook(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            call = Call(path, module, next(counter), input=args[0] if args else None)
            calls.append(call)
            open_calls.setdefault(id(module), []).append(call)

        return hook

    def post_hook(module: nn.Module, _args: tuple, output: Any) -> None:
        call = open_calls[id(module)].pop()
        call.end, call.output = next(counter), output
        call.output_version = output._version if isinstance(output, torch.Tensor) else -1

    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(pre_hook(path)))
            handles.append(module.register_forward_hook(post_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls, output


class RunUntil(nn.Module):
    """The model's own forward from its input up to `stop`: returns what `stop` receives.

    The first item of a chain. Holds the model without registering it, so it has no parameters
    of its own (the calls it covers are backbone, METHOD 4.1 rule 5).
    """

    class _Stop(Exception):
        pass

    def __init__(self, model: nn.Module, stop: nn.Module) -> None:
        super().__init__()
        self.refs = (model, stop)  # a tuple is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, stop = self.refs
        received: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> None:
            received.append(args[0])
            raise RunUntil._Stop

        handle = stop.register_forward_pre_hook(hook)
        try:
            model(x)
        except RunUntil._Stop:
            pass
        finally:
            handle.remove()
        if not received:
            raise RuntimeError(f"the forward of {type(model).__name__} never reached {type(stop).__name__}")
        return received[0]


def _prefix_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    return x[:, k:].mean(dim=1)


# Steps forward code takes between two module calls (name, applies-to-rank, function).
GLUE: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "flatten": (0, lambda x, k: x.flatten(1)),
    "spatial_mean": (4, lambda x, k: x.mean(dim=(2, 3))),
    "class_token": (3, lambda x, k: x[:, 0]),
    "token_mean": (3, lambda x, k: x.mean(dim=1)),
    "patch_token_mean": (3, _prefix_mean),  # timm's avg pooling after the prefix (class/register) tokens
    "to_channels_first": (4, lambda x, k: x.permute(0, 3, 1, 2)),
    "to_channels_last": (4, lambda x, k: x.permute(0, 2, 3, 1)),
}


class Glue(nn.Module):
    """A parameter-free step of the model's forward code between two module calls (`GLUE`)."""

    def __init__(self, kind: str, prefix_tokens: int = 0) -> None:
        super().__init__()
        self.kind, self.prefix_tokens = kind, prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GLUE[self.kind][1](x, self.prefix_tokens)

    def extra_repr(self) -> str:
        return self.kind


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    if a.is_meta or b.is_meta:
        return a is b
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def find_glue(current: Any, target: Any, prefix_tokens: int) -> list[Glue] | None:
    """How forward code turns `current` into `target`: [] (it is the same tensor, or equal to it),
    [one Glue], or None when no `GLUE` step does."""
    if target is current or _same(current, target):
        return []
    if not isinstance(current, torch.Tensor) or current.is_meta:
        return None
    for kind, (rank, _) in GLUE.items():
        if rank and current.dim() != rank or kind == "patch_token_mean" and prefix_tokens < 1:
            continue
        glue = Glue(kind, prefix_tokens)
        try:
            if _same(glue(current), target):
                return [glue]
        except (RuntimeError, IndexError):
            continue
    return None


def _outermost(calls: list[Call], after: int, before: int) -> list[Call]:
    """Calls lying entirely between counters `after` and `before`, not nested in one another."""
    out: list[Call] = []
    for call in calls:
        if call.start > after and call.end < before and not (out and call.end < out[-1].end):
            out.append(call)
    return out


def find_blocks(model: nn.Module, calls: list[Call], what: str) -> tuple[str, list[Call]]:
    """("blocks" | "stages" | "activations", the generalized-layer calls other than the stem), in
    call order (see the module docstring)."""
    by_module: dict[int, list[Call]] = {}
    for call in calls:
        by_module.setdefault(id(call.module), []).append(call)

    def called(paths: list[str]) -> list[Call]:
        modules = dict(model.named_modules())
        out = []
        for path in paths:
            made = by_module.get(id(modules[path]), [])
            if len(made) > 1:
                raise ConfigError(
                    f"{what}: {path} ({type(modules[path]).__name__}) runs {len(made)} times per forward, but a "
                    "generalized layer must run once; choose another model"
                )
            out.extend(made)
        return sorted(out, key=lambda c: c.start)

    blocks: list[str] = []
    for path, module in model.named_modules():
        if path and BLOCK_NAME.search(type(module).__name__) and not any(path.startswith(b + ".") for b in blocks):
            blocks.append(path)
    if blocks:
        return "blocks", called(blocks)
    stages = [info["module"] for info in getattr(model, "feature_info", None) or [] if isinstance(info, dict) and info.get("module")]
    if stages:
        return "stages", called(stages)
    # METHOD 4.1: activations up to the head, which starts at the first Linear (rule 5).
    first_linear = min((c.start for c in calls if isinstance(c.module, nn.Linear)), default=len(calls) * 2)
    return "activations", [
        c for c in calls if isinstance(c.module, ACTIVATIONS) and len(by_module[id(c.module)]) == 1 and c.end < first_linear
    ]


def _channels_last(call: Call) -> bool:
    """A block handing on (B, H, W, C): a known class, or a 4-D output whose last dim (not dim 1)
    is what a LayerNorm inside the block normalises (Swin, TinyViT)."""
    out = call.output
    if type(call.module).__name__ in CHANNELS_LAST_BLOCKS:
        return True
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] == out.shape[-1]:
        return False
    return any(isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (out.shape[-1],) for m in call.module.modules())


def find_stem(calls: list[Call], first: Call) -> Call | None:
    """The last module call producing exactly the first block's input (through pass-through calls)."""
    target = first.input
    for call in reversed(_outermost(calls, -1, first.start)):
        if call.output is not target:
            continue
        if isinstance(call.module, PASS_THROUGH):
            target = call.input
            continue
        return call
    return None


@dataclass(frozen=True)
class LayerCalls:
    stem: Call | None
    blocks: list[Call]

    @property
    def all(self) -> list[Call]:
        """The generalized layers in order: the stem (when there is one), then the blocks."""
        return ([self.stem] if self.stem is not None else []) + self.blocks


def generalized_layer_calls(model: nn.Module, calls: list[Call], what: str) -> LayerCalls:
    """Stem (when there is one) and blocks, in call order; ConfigError when there are none."""
    kind, blocks = find_blocks(model, calls, what)
    if not blocks:
        raise ConfigError(
            f"{what}: no generalized layers found (no residual, inverted-residual or transformer blocks, no "
            "timm feature_info stages, no ReLUs); choose another model"
        )
    for call in blocks:
        if _channels_last(call):
            raise ConfigError(
                f"{what}: its block {call.path} ({type(call.module).__name__}) gives channels-last (B, H, W, C) maps, which "
                "the projectors would read as (C, H, W); choose a model with channels-first or token outputs"
            )
        if not isinstance(call.output, torch.Tensor):
            raise ConfigError(f"{what}: block {call.path} returns a {type(call.output).__name__}, not a tensor")
    layers = LayerCalls(find_stem(calls, blocks[0]) if kind == "blocks" else None, blocks)
    for call in layers.all:
        if call.output._version != call.output_version:
            raise ConfigError(
                f"{what}: the output of {call.path} is changed in place later in the forward, so it cannot be "
                "recorded as a feature; choose another model"
            )
    return layers


def _link(calls: list[Call], current: Any, target: Any, into: str, what: str, prefix_tokens: int) -> list[tuple[str, nn.Module]]:
    """The items that carry `current` through `calls` (with glue) and on to `target`, the input
    of `into`; ConfigError where forward code does something `GLUE` does not know."""
    items: list[tuple[str, nn.Module]] = []
    for call in calls:
        if isinstance(call.output, torch.Tensor) and call.output._version != call.output_version:
            raise ConfigError(
                f"{what}: forward code changes the output of {call.path} in place, so its forward cannot be "
                "followed from module to module; choose another model"
            )
    for path, module, received, produced in [(c.path, c.module, c.input, c.output) for c in calls] + [(into, None, target, None)]:
        glue = find_glue(current, received, prefix_tokens)
        if glue is None:
            raise ConfigError(
                f"{what}: cannot follow its forward into {path}: the forward code transforms the tensor there in "
                "a way not recognised (see common/models/tracing.py); choose another model"
            )
        items += [(f"({g.kind})", g) for g in glue]
        if module is not None:
            items.append((path, module))
            current = produced
    return items


def build_chain(model: nn.Module, x: torch.Tensor, classifier: nn.Module | None, what: str) -> LayerChain:
    """Trace `model(x)` and return its LayerChain, checked by replaying it on `x`."""
    calls, logits = trace(model, x)
    layers = generalized_layer_calls(model, calls, what).all
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    items: list[tuple[str, nn.Module]] = [(f"(forward up to {layers[0].path})", RunUntil(model, layers[0].module))]
    boundaries: list[int] = []
    for previous, layer in zip([None, *layers], layers):
        if previous is not None:
            gap = _outermost(calls, previous.end, layer.start)
            items += _link(gap, previous.output, layer.input, layer.path, what, prefix_tokens)
        boundaries.append(len(items))
        items.append((layer.path, layer.module))
    tail = _outermost(calls, layers[-1].end, 2 * len(calls))
    items += _link(tail, layers[-1].output, logits, "the logits", what, prefix_tokens)
    chain = LayerChain(tuple(items), tuple(boundaries), _head_position(items, boundaries[-1], classifier, calls))
    _check_replay(model, chain, x, logits, what)
    return chain


def _head_position(items: list[tuple[str, nn.Module]], last_layer: int, classifier: nn.Module | None, calls: list[Call]) -> int:
    """The first item after the last layer that holds the classifier (else the last item with parameters)."""
    if classifier is None:
        linears = [c for c in calls if isinstance(c.module, nn.Linear)]
        classifier = max(linears, key=lambda c: c.end).module if linears else None
    for position in range(last_layer + 1, len(items)):
        if classifier is not None and any(m is classifier for m in items[position][1].modules()):
            return position
    with_params = [p for p in range(last_layer + 1, len(items)) if any(True for _ in items[p][1].parameters())]
    return with_params[-1] if with_params else len(items) - 1


def _check_replay(model: nn.Module, chain: LayerChain, x: torch.Tensor, logits: torch.Tensor, what: str) -> None:
    if x.is_meta:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = x
            for _, module in chain.items:
                out = module(out)
    finally:
        model.train(was_training)
    if not _same(out, logits):
        raise ConfigError(
            f"{what}: replaying its generalized layers and head does not reproduce its forward; choose another model"
        )


def layer_calls(model: nn.Module, x: torch.Tensor, what: str) -> LayerCalls:
    """The generalized-layer calls only (no chain): works on the meta device, for shapes."""
    calls, _ = trace(model, x)
    return generalized_layer_calls(model, calls, what)
