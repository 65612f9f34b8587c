"""Published CIFAR KD zoo checkpoints into a zoo model (`teacher.pretrained=PATH`).

RepDistiller's train_teacher.py (and mdistiller, whose `cifar_teachers` are those files) saves
`{"epoch": ..., "model": state_dict, "accuracy": ..., "optimizer": ...}`, e.g.
`resnet32x4_vanilla/ckpt_epoch_240.pth`; a bare state dict is taken as well, and DataParallel's
"module." prefixes go. The load is strict: a published teacher is used as it is, so a file of
another architecture or of another number of classes is refused with one ConfigError naming the
file and what differs (and, when the file is another zoo model, which one).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError

StateDict = dict[str, torch.Tensor]
LAYOUT = '{"model": state_dict, ...} (RepDistiller / mdistiller) or a bare state dict'
SHOWN = 2  # differences named in an error message


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def read_zoo_checkpoint(path: str) -> StateDict:
    """The state dict in `path`: under "model" (the published layout) or the whole file.

    Read with `weights_only=True` (tensors and plain containers, no code), on the CPU whatever
    device it was saved from.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"checkpoint '{path}' not found; set teacher.pretrained to a local {LAYOUT} file")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise ConfigError(
            f"checkpoint '{path}' cannot be read as a torch file ({type(exc).__name__}: {_first_line(exc)}); "
            f"give a {LAYOUT} saved with torch.save"
        ) from None
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"checkpoint '{path}' holds {found}, not a state dict; give a {LAYOUT}")
    if all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def classifier_prefix(model: nn.Module) -> str:
    """'fc.' / 'linear.' / 'classifier.0.': the state-dict prefix of the model's last Linear."""
    paths = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not paths:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return paths[-1] + "."


def _shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=1)
def _zoo_signatures() -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """name -> (classifier prefix, key shapes without the classifier), built on the meta device."""
    from common.models.cifar import PREFIX, ZOO

    out = {}
    with torch.device("meta"):
        for arch, build in ZOO.items():
            model = build(num_classes=1)
            head = classifier_prefix(model)
            out[PREFIX + arch] = (head, {k: s for k, s in _shapes(model.state_dict()).items() if not k.startswith(head)})
    return out


def identify(state: StateDict) -> tuple[str, int] | None:
    """(zoo name, classes) of the zoo model whose layout `state` has, or None."""
    shapes = _shapes(state)
    for name, (head, body) in _zoo_signatures().items():
        weight = shapes.get(head + "weight")
        if weight is not None and {k: s for k, s in shapes.items() if not k.startswith(head)} == body:
            return name, weight[0]
    return None


def _differences(expected: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> str:
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    shapes = [f"{k} {have[k]} vs {s}" for k, s in expected.items() if k in have and have[k] != s]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if items:
            parts.append(f"{len(items)} keys {what} (e.g. {', '.join(items[:SHOWN])})")
    return "; ".join(parts)


def load_zoo_checkpoint(model: nn.Module, path: str, *, name: str | None = None) -> None:
    """Load the published checkpoint `path` into the zoo `model`, strictly.

    Refuses, with one ConfigError naming the file: a file of another architecture (saying which
    zoo model it is, when it is one) and a file whose classifier has another number of classes.
    `num_batches_tracked` may be absent (files from before PyTorch 0.4.1 lack it).
    """
    name = name or type(model).__name__
    state = read_zoo_checkpoint(path)
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    want, have = _shapes(expected), _shapes(state)
    if want == have:
        model.load_state_dict(state, strict=True)
        return
    head = classifier_prefix(model)
    body_want = {k: s for k, s in want.items() if not k.startswith(head)}
    body_have = {k: s for k, s in have.items() if not k.startswith(head)}
    weight = have.get(head + "weight")
    if body_want == body_have and weight is not None and set(want) == set(have):
        classes = want[head + "weight"][0]
        raise ConfigError(
            f"checkpoint '{path}' is {name} for {weight[0]} classes ({head}weight {weight}), but the model is built "
            f"for {classes} (the dataset's); a published teacher is used as it is, so give a checkpoint trained on "
            f"this dataset's {classes} classes, or use this one with a {weight[0]}-class dataset"
        )
    found = identify(state)
    looks = f"it is a {found[1]}-class {found[0]} checkpoint" if found else "it is not a CIFAR KD zoo model"
    fix = f"set the model name to {found[0]}, or give a {name} checkpoint" if found else f"give a {name} checkpoint"
    raise ConfigError(f"checkpoint '{path}' does not hold {name}: {looks} ({_differences(want, have)}); {fix}")


__all__ = ["classifier_prefix", "identify", "load_zoo_checkpoint", "read_zoo_checkpoint"]
