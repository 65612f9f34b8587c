"""Bring your own model: any torchvision or timm classifier by name, `tv:<name>` / `timm:<name>`.

    create_model("tv:resnet18", num_classes=10, in_channels=1, image_size=28)
    create_model("timm:deit_tiny_patch16_224", num_classes=100, image_size=32)

Built with the dataset's classes, channels and (where the model takes it: ViTs) image size, never
with downloaded weights (torchvision `weights=None`, timm `pretrained=False`); a local checkpoint
comes in through `load_checkpoint` (`teacher.pretrained=PATH`). Models other than 3-channel ones
get their first convolution summed over RGB (1 channel: the network applied to the grey image
replicated, as `common.models.pretrained` does) or repeated and scaled (timm's rule). In-place
activations are switched off (same results) so a recorded feature never changes afterwards.

Each built model carries its `LayerChain` (`common.models.tracing`): stem + blocks as
generalized layers, the classifier as the head. `describe` gives what the registry needs without
a real build: the layers' shapes from a meta-device forward at the model's default input size,
hence the baseline list and the family.
"""
from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.models import tracing
from common.models.pretrained import load_matching_state, read_state_dict, resample_position_embedding
from common.registry import UnknownNameError

LIBRARIES = {"tv": "torchvision", "timm": "timm"}
HOW_TO_FIND = {
    "tv": "list them with: python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'",
    "timm": "list them with: python -c 'import timm; print(timm.list_models(\"resnet*\"))' (any pattern)",
}
TORCHVISION_DEFAULT_SIZE = 224  # every torchvision classifier's ImageNet size (ViT image_size default)
BASELINE_COUNT = 4  # layers in a baseline list, as every list of METHOD 4.2


def split_name(name: str) -> tuple[str, str] | None:
    """'tv:resnet18' -> ('tv', 'resnet18'); None for a name without a library prefix."""
    prefix, sep, arch = name.partition(":")
    return (prefix, arch) if sep and prefix in LIBRARIES else None


def _library_name(name: str) -> tuple[str, str]:
    parts = split_name(name)
    if parts is None or not parts[1]:
        raise ConfigError(f"model '{name}' is not tv:<torchvision name> or timm:<timm name>")
    return parts


def check_arch(name: str) -> None:
    """UnknownNameError (with a close match and how to list names) for a name the library lacks."""
    library, arch = _library_name(name)
    if library == "tv":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classifiers only
    else:
        import timm

        if timm.is_model(arch.split(".")[0]):
            return
        known = timm.list_models()
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f" (did you mean {', '.join(f'{library}:{c}' for c in close)}?)" if close else ""
    raise UnknownNameError(f"unknown {LIBRARIES[library]} classification model '{arch}'{hint}; {HOW_TO_FIND[library]}")


# ----------------------------------------------------------------------------- building


def _with_optional_size(build: Callable[..., nn.Module], size_key: str, image_size: int, **kwargs) -> nn.Module:
    """Build with `size_key=image_size` when the model takes it (ViTs), else without."""
    try:
        return build(**kwargs, **{size_key: image_size})
    except TypeError as exc:
        if size_key not in str(exc):
            raise
    return build(**kwargs)


def adapt_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel first-layer kernel for `in_channels` inputs: summed over RGB for 1 (the network
    on the grey image replicated), else repeated and scaled by 3 / in_channels (timm's rule)."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _first_conv_path(model: nn.Module) -> str:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return path
    raise ConfigError(f"{type(model).__name__} has no 3-channel input convolution to adapt to other channel counts")


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the torchvision model's first 3-channel Conv2d by an `in_channels` one (adapted kernel)."""
    path = _first_conv_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old: nn.Conv2d = getattr(parent, attr)
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
        old.groups, old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype,
    )
    with torch.no_grad():
        if not old.weight.is_meta:
            new.weight.copy_(adapt_input_weight(old.weight, in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    setattr(parent, attr, new)


def construct(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The library model with the dataset's classes/channels/size, random init, no layer chain."""
    check_arch(name)
    library, arch = _library_name(name)
    try:
        if library == "tv":
            import torchvision

            model = _with_optional_size(
                torchvision.models.get_model, "image_size", image_size, name=arch, weights=None, num_classes=num_classes
            )
            if in_channels != 3:
                _adapt_input_channels(model, in_channels)
        else:
            import timm

            model = _with_optional_size(
                timm.create_model, "img_size", image_size, model_name=arch, pretrained=False,
                num_classes=num_classes, in_chans=in_channels,
            )
    except (ConfigError, UnknownNameError):
        raise
    except Exception as exc:  # library errors: the message is the library's
        raise ConfigError(f"{name} cannot be built for {num_classes} classes at {in_channels}x{image_size}x{image_size}: {_first_line(exc)}") from None
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # same results; a recorded feature must not change afterwards
    return model


def classifier_of(model: nn.Module) -> nn.Module | None:
    """timm's `get_classifier()`; None for torchvision (the head is then the last Linear called)."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    return classifier if isinstance(classifier, nn.Module) else None


def build(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> nn.Module:
    """`construct` + the model's LayerChain (one traced forward at the dataset's input size)."""
    if width != 1.0:
        raise width_error(name, width)
    model = construct(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    generator = torch.Generator().manual_seed(0)  # the trace input never touches the run's RNG
    x = torch.randn(2, in_channels, image_size, image_size, generator=generator)
    try:
        model.layer_chain = tracing.build_chain(model, x, classifier_of(model), name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{name} does not run on {in_channels}x{image_size}x{image_size} inputs: {_first_line(exc)}; try another dataset.image_size") from None
    return model


def width_error(name: str, width: float) -> ConfigError:
    library = LIBRARIES[_library_name(name)[0]]
    return ConfigError(
        f"model '{name}' is built as {library} defines it, so width={width:g} has no meaning; set teacher.width=1.0 "
        f"(or student.width=1.0, whichever names '{name}') and choose a smaller {library} model by name instead"
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# ----------------------------------------------------------------------------- registry facts


@dataclass(frozen=True)
class Description:
    shapes: tuple[tuple[int, ...], ...]  # per-sample output shape of each generalized layer
    has_stem: bool  # layer 0 is the stem (not a block)
    baseline_layers: tuple[int, ...]
    family: str  # "vit" when the blocks give tokens (T, D), else "cnn"


def _default_size(name: str) -> int:
    library, arch = _library_name(name)
    if library == "tv":
        return TORCHVISION_DEFAULT_SIZE
    import timm

    size = timm.get_pretrained_cfg_value(arch, "input_size") if timm.get_pretrained_cfg(arch) else None
    return int(size[-1]) if size else TORCHVISION_DEFAULT_SIZE


@functools.lru_cache(maxsize=None)
def describe(name: str) -> Description:
    """Layer shapes at the model's default input size (3 channels, 10 classes), on the meta device
    (no memory, no init) when the library allows, else on the CPU; and the baseline list."""
    check_arch(name)
    size = _default_size(name)
    x_shape = (2, 3, size, size)
    try:
        with torch.device("meta"):
            model = construct(name, num_classes=10, in_channels=3, image_size=size)
            calls = tracing.layer_calls(model, torch.empty(x_shape), name)
    except Exception:  # some models compute values while building (torchvision RegNet): on the CPU
        with torch.random.fork_rng(devices=[]):
            model = construct(name, num_classes=10, in_channels=3, image_size=size)
            calls = tracing.layer_calls(model, torch.zeros(x_shape), name)
    shapes = tuple(tuple(c.output.shape[1:]) for c in calls.all)
    has_stem = calls.stem is not None
    baseline = baseline_layers(shapes, first_block=1 if has_stem else 0)
    family = "vit" if len(shapes[-1]) == 2 else "cnn"
    return Description(shapes, has_stem, baseline, family)


def baseline_layers(shapes: tuple[tuple[int, ...], ...], first_block: int) -> tuple[int, ...]:
    """The baseline distillation list: the last block of each of the last four resolution stages
    (blocks grouped by spatial size (H, W), tokens by count; vectors left out), METHOD 4.2's rule for the CNNs
    (ResNet34 3, 7, 13, 16; MobileNetV2 3, 6, 13, 17). With fewer than four stages (a ViT: one),
    the last block of each quarter of the depth, the ViT lists' "spread over depth"."""
    indices = [i for i in range(first_block, len(shapes)) if len(shapes[i]) > 1] or list(range(first_block, len(shapes)))
    if len(indices) <= BASELINE_COUNT:
        return tuple(indices)

    def stage_key(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[1:]) if len(shape) == 3 else tuple(shape[:1]) if len(shape) == 2 else shape

    last_of_stage = [i for i, j in zip(indices, indices[1:] + [None]) if j is None or stage_key(shapes[i]) != stage_key(shapes[j])]
    if len(last_of_stage) >= BASELINE_COUNT:
        return tuple(last_of_stage[-BASELINE_COUNT:])
    n = len(indices)
    return tuple(indices[math.ceil(n * (q + 1) / BASELINE_COUNT) - 1] for q in range(BASELINE_COUNT))


# ----------------------------------------------------------------------------- checkpoints


def _hint(name: str) -> str:
    return f"set teacher.pretrained to a state dict (.pt/.pth) or .safetensors file of {name}"


def load_checkpoint(model: nn.Module, path: str, *, name: str) -> None:
    """A local checkpoint of this architecture into `model` (`teacher.pretrained=PATH`).

    The file is a state dict (.pt/.pth, possibly under "state_dict" or "model", "module." prefixes
    of DDP stripped) or a .safetensors file. Strict, except: the classifier keeps its fresh init
    when the file's shape differs (other classes); a 3-channel input kernel is adapted to the
    model's channels (`adapt_input_weight`); a ViT position embedding is resampled to the model's
    grid (timm: `resample_abs_pos_embed`; torchvision: class entry first, as for the paper's ViT);
    BatchNorm `num_batches_tracked` may be absent. Anything else is a one-line ConfigError.
    """
    state = read_state_dict(path, name, hint=_hint(name))
    expected = model.state_dict()
    head = _classifier_prefix(model)
    for key, want in expected.items():
        have = state.get(key)
        if have is None:
            if key.endswith("num_batches_tracked"):
                state[key] = want
            continue
        if have.shape == want.shape:
            continue
        if head and key.startswith(head):
            state[key] = want  # new classes: the fresh head stays
        elif have.dim() == 4 and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            state[key] = adapt_input_weight(have, want.shape[1]).to(have.dtype)
        elif have.dim() == 3 and key.endswith(("pos_embed", "pos_embedding")):
            state[key] = _resample_pos_embed(model, key, have, want)
    load_matching_state(model, state, path, name, hint=_hint(name))


def _classifier_prefix(model: nn.Module) -> str | None:
    """'fc.' / 'head.fc.' / 'heads.head.' ...: the state-dict prefix of the classifier module."""
    chain = getattr(model, "layer_chain", None)
    classifier = classifier_of(model)
    if classifier is None and chain is not None:
        linears = [m for _, item in chain.items[chain.head :] for m in item.modules() if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
    for path, module in model.named_modules():
        if classifier is not None and module is classifier:
            return path + "."
    return None


def _resample_pos_embed(model: nn.Module, key: str, have: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    if key == "pos_embed" and hasattr(model, "patch_embed"):
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = tuple(model.patch_embed.grid_size)
        return resample_abs_pos_embed(have, new_size=list(grid), num_prefix_tokens=prefix).to(have.dtype)
    grid = int(round(math.sqrt(want.shape[1] - 1)))
    try:
        return resample_position_embedding(have, grid)
    except ValueError:
        return have  # left as it is: load_matching_state reports the shape


__all__ = [
    "Description", "LIBRARIES", "adapt_input_weight", "baseline_layers", "build", "check_arch",
    "classifier_of", "construct", "describe", "load_checkpoint", "split_name", "width_error",
]
