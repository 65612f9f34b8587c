"""Load LOCAL torchvision ImageNet state-dict files into our CIFAR-style models (METHOD 3).

The readers (`read_state_dict`, `load_matching_state`) also serve torchvision/timm models by name
(`common.models.external.load_checkpoint`).

Nothing is ever downloaded: `path` is a file the user placed on disk (e.g. resnet34-333f7ec4.pth,
vgg19_bn-c79401a0.pth, vit_b_16-c867db91.pth). Every problem (missing file, not a state dict,
wrong architecture) is a one-line ConfigError naming the file. Random replacements use torch's
global RNG, so they follow the run's seed.

Single-channel models (Fashion-MNIST) keep the ImageNet first-layer kernel summed over its RGB
inputs, which is exactly the network applied to the grey image replicated to three channels.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.models.resnet import ResNet
from common.models.vgg import VGG
from common.models.vit import VisionTransformer

StateDict = dict[str, torch.Tensor]


NESTED_KEYS = ("state_dict", "model")  # training checkpoints keep the weights under one of these


def _fail(path: str, arch: str, problem: str, hint: str | None = None) -> ConfigError:
    hint = hint or f"set model.pretrained to a torchvision ImageNet {arch} state-dict file"
    return ConfigError(f"pretrained file '{path}' does not fit {arch}: {problem}; {hint}")


def read_state_dict(path: str, arch: str, hint: str | None = None) -> StateDict:
    """A plain {name: tensor} state dict from `path` (memory-mapped when the format allows).

    A .safetensors file is read with safetensors; a torch file may hold the weights under
    "state_dict" or "model" (training checkpoints), with DDP's "module." prefixes, which go.
    """
    file = Path(path).expanduser()  # config files give ~/weights/... (configs/cifar10.yaml)
    if not file.is_file():
        raise ConfigError(
            f"pretrained file '{path}' not found; set model.pretrained to a local file (nothing is downloaded)"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as exc:  # pickle, zip, safetensors and torch errors all mean "not a readable checkpoint"
        kind = "a safetensors file" if file.suffix == ".safetensors" else "a torch checkpoint"
        raise _fail(path, arch, f"it cannot be read as {kind} ({type(exc).__name__})", hint) from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _fail(path, arch, "it is not a plain {name: tensor} state dict", hint)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_matching_state(model: nn.Module, state: StateDict, path: str, arch: str, hint: str | None = None) -> None:
    """Strict load, with key and shape mismatches reported in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if items
    ]
    if problems:
        raise _fail(path, arch, "; ".join(problems), hint)
    model.load_state_dict(state, strict=True)


def adapt_input_kernel(weight: torch.Tensor, in_channels: int, path: str, arch: str) -> torch.Tensor:
    """ImageNet RGB kernel -> `in_channels` inputs: kept for 3, summed over RGB for 1."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise _fail(path, arch, f"its first layer takes {weight.shape[1]} channels, the model {in_channels}")


def load_resnet(model: nn.Module, path: str) -> None:
    """torchvision ResNet18/34 ImageNet weights (METHOD 3.1): strict load, except `conv1` (7x7 in
    the file) is a fresh Kaiming-normal (fan_out, relu) in_channels x 3x3 kernel and `fc` is
    N(0, 0.01) / 0 for the new classes."""
    if not isinstance(model, ResNet):
        raise ConfigError(f"load_resnet got a {type(model).__name__}; use it for ResNet models only")
    arch = "ResNet"
    state = read_state_dict(path, arch)
    for key in ("conv1.weight", "fc.weight", "fc.bias"):
        if key not in state:
            raise _fail(path, arch, f"missing {key}")
    conv1 = torch.empty_like(model.conv1.weight)
    state["conv1.weight"] = nn.init.kaiming_normal_(conv1, mode="fan_out", nonlinearity="relu")
    state["fc.weight"] = nn.init.normal_(torch.empty_like(model.fc.weight), 0.0, 0.01)
    state["fc.bias"] = torch.zeros_like(model.fc.bias)
    load_matching_state(model, state, path, arch)


def load_vgg(model: nn.Module, path: str) -> None:
    """torchvision vgg11_bn / vgg19_bn ImageNet weights (METHOD 3.2): strict load, except
    classifier.0.weight (4096 x 25088 in the file, for a 7x7 pool) becomes a new N(0, 0.01)
    4096 x 512 tensor with the ImageNet bias kept, classifier.3 is kept, and classifier.6 is
    N(0, 0.01) / 0 for the new classes."""
    if not isinstance(model, VGG):
        raise ConfigError(f"load_vgg got a {type(model).__name__}; use it for VGG models only")
    arch = "VGG-BN"
    state = read_state_dict(path, arch)
    for key in ("features.0.weight", "classifier.0.weight", "classifier.6.weight", "classifier.6.bias"):
        if key not in state:
            raise _fail(path, arch, f"missing {key}")
    in_channels = model.features[0].in_channels
    state["features.0.weight"] = adapt_input_kernel(state["features.0.weight"], in_channels, path, arch)
    state["classifier.0.weight"] = nn.init.normal_(torch.empty_like(model.classifier[0].weight), 0.0, 0.01)
    state["classifier.6.weight"] = nn.init.normal_(torch.empty_like(model.classifier[6].weight), 0.0, 0.01)
    state["classifier.6.bias"] = torch.zeros_like(model.classifier[6].bias)
    load_matching_state(model, state, path, arch)


# torchvision VisionTransformer key prefixes -> ours (METHOD 3.4); the first match wins.
VIT_KEY_RULES: tuple[tuple[str, str], ...] = (
    ("conv_proj.", "patch_embed.conv_proj."),
    ("class_token", "patch_embed.class_token"),
    ("encoder.pos_embedding", "pos_embed.pos_embedding"),
    ("encoder.layers.", "encoder."),
    ("encoder.ln.", "ln."),
)
# Legacy torchvision (IMAGENET1K_V1 file) MLP names -> current Sequential indices.
VIT_LEGACY_MLP = {"mlp.linear_1.": "mlp.0.", "mlp.linear_2.": "mlp.3."}


def rename_torchvision_vit_keys(state: StateDict) -> StateDict:
    """torchvision ViT keys -> ours; the ImageNet head (`heads.*`) is dropped."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("heads."):
            continue
        new = next((new + key[len(old) :] for old, new in VIT_KEY_RULES if key.startswith(old)), key)
        for old, cur in VIT_LEGACY_MLP.items():
            new = new.replace(old, cur)
        out[new] = value
    return out


def resample_position_embedding(pos_embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the patch grid is resampled with
    scipy.ndimage.zoom(order=1), the class-token entry stays FIRST and unchanged.

    This is the intended behaviour; the reference takes the *last* entry as the class token and
    appends it at the end (METHOD 12.12), which we do not replicate.
    """
    tokens, dim = pos_embedding.shape[1:]
    old = int(round(np.sqrt(tokens - 1)))
    if old * old != tokens - 1:
        raise ValueError(f"position embedding of {tokens} tokens is not 1 + a square grid")
    class_entry, patch_grid = pos_embedding[:, :1], pos_embedding[0, 1:]
    if old != grid:
        from scipy import ndimage  # here: 0.6 s of import that only a ViT position-embedding resize needs

        zoomed = ndimage.zoom(patch_grid.reshape(old, old, dim).double().numpy(), (grid / old, grid / old, 1), order=1)
        patch_grid = torch.from_numpy(zoomed).to(pos_embedding.dtype).reshape(grid * grid, dim)
    return torch.cat([class_entry, patch_grid.unsqueeze(0)], dim=1)


def shrink_patch_kernel(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """(D, C, P, P) -> (D, C, patch, patch) by average pooling with window = stride = P / patch
    (the reference's rule; it scales the response by 1/f^2 vs. a summed kernel, METHOD 12.12)."""
    factor = weight.shape[-1] // patch
    return weight if factor == 1 else F.avg_pool2d(weight, kernel_size=factor, stride=factor)


def load_vit(model: nn.Module, path: str) -> None:
    """torchvision VisionTransformer ImageNet weights (e.g. vit_b_16) into our ViT (METHOD 3.4):
    keys renamed (legacy mlp.linear_1/2 and current mlp.0/3 both accepted), ImageNet head dropped
    (ours stays zero), position-embedding grid resampled to the model's grid, patch kernel
    shrunk by average pooling. Depth, heads, dim and MLP dim must match the file."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"load_vit got a {type(model).__name__}; use it for ViT models only")
    arch = "ViT"
    state = rename_torchvision_vit_keys(read_state_dict(path, arch))
    for key in ("patch_embed.conv_proj.weight", "pos_embed.pos_embedding"):
        if key not in state:
            raise _fail(path, arch, f"missing {key.replace('patch_embed.', '').replace('pos_embed.', 'encoder.')}")
    conv = model.patch_embed.conv_proj
    patch, src_patch = conv.kernel_size[0], state["patch_embed.conv_proj.weight"].shape[-1]
    if src_patch % patch:
        raise _fail(path, arch, f"its patch size {src_patch} is not a multiple of the model's {patch}")
    weight = shrink_patch_kernel(state["patch_embed.conv_proj.weight"], patch)
    state["patch_embed.conv_proj.weight"] = adapt_input_kernel(weight, conv.in_channels, path, arch)
    grid = int(round(np.sqrt(model.pos_embed.pos_embedding.shape[1] - 1)))
    try:
        state["pos_embed.pos_embedding"] = resample_position_embedding(state["pos_embed.pos_embedding"], grid)
    except ValueError as exc:
        raise _fail(path, arch, str(exc)) from None
    state["head.weight"], state["head.bias"] = model.head.weight.detach(), model.head.bias.detach()
    load_matching_state(model, state, path, arch)


# The loaders above rebuild the stem and the head for CIFAR-sized inputs (METHOD 3.1, 3.2, 3.4)
# whatever the file holds, so a model they load is never the checkpoint as it is: such a teacher
# is always fine-tuned (common.models.as_is.teacher_as_is).
ADAPTING_LOADERS = (load_resnet, load_vgg, load_vit)


def checkpoint_classes(model: nn.Module, state: StateDict) -> int | None:
    """The number of classes of a checkpoint's state dict: the rows of its tensor at the key of
    `model`'s classifier (its last nn.Linear, as `common.models.cifar.checkpoint.classifier_prefix`
    finds it). None when `state` has no 2-D tensor there: the classes cannot be known.

    The classifier is found on the model, not guessed from the file, because a file's last
    tensor need not be its head (BatchNorm statistics, auxiliary heads). `state` comes from the
    reader the model's loader uses (`read_state_dict`, or the zoo's `read_zoo_checkpoint`)."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    weight = state.get(heads[-1] + ".weight") if heads else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
