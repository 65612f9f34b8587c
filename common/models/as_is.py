"""Whether a teacher checkpoint is used as it is or trained further: a fact about the checkpoint
(its model's loader, its classifier) and the dataset's number of classes.

It lives below the stages because both the artifacts' layout (the teacher directory's key,
`common.artifacts.layout.teacher_key`) and stage 1 (`common.profile.teacher.ensure_teacher`) read
it, and the layout must not import a stage package.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import Config
from common.errors import ConfigError
from common.models import MODELS, create_model
from common.models.cifar import PREFIX as ZOO_PREFIX
from common.models.cifar.checkpoint import read_zoo_checkpoint
from common.models.pretrained import ADAPTING_LOADERS, checkpoint_classes, read_state_dict

if TYPE_CHECKING:
    from common.data.registry import Data


def teacher_as_is(cfg: Config, data: Data) -> bool:
    """True when the teacher is its checkpoint as it is: evaluated, profiled and distilled from,
    never trained; False when it is trained (from scratch, or fine-tuned from the checkpoint).

    `teacher.finetune`: true trains; false uses the checkpoint as it is, or stops with a
    ConfigError where it cannot be; auto (the default) uses it as it is exactly when it can be:
    the model's loader keeps the file's classifier (the CIFAR zoo's and tv:/timm:'s do; the paper
    models' ImageNet loaders, `ADAPTING_LOADERS`, replace the stem and head) and that classifier
    has the dataset's number of classes (`checkpoint_classes`). So a published CIFAR-100 teacher
    on CIFAR-100 is used as the CRD / DKD tables use it, and an ImageNet checkpoint on CIFAR is
    fine-tuned with a new head (METHOD 5). Without a checkpoint the teacher is trained.
    """
    t = cfg.teacher
    finetune = getattr(t, "finetune", "auto")  # a plain ModelConfig in the teacher's place: auto
    if t.pretrained is None or finetune is True:
        return False
    if MODELS.get(t.name).load_pretrained in ADAPTING_LOADERS:
        if finetune is False:
            raise ConfigError(
                f"teacher.finetune=false: {t.name}'s ImageNet loader replaces the first layer and the classifier "
                f"(METHOD 3), so its checkpoint {t.pretrained} cannot be used as it is; set teacher.finetune=auto "
                f"(fine-tunes it), or use the checkpoint's own architecture as tv:<name> / timm:<name>"
            )
        return False
    classes = _checkpoint_classes(cfg, data)
    if classes == data.num_classes:
        return True
    if finetune is False:
        found = f"its classifier has {classes} classes" if classes is not None else "no classifier of the model is in it"
        # The zoo loader refuses other classes (a published teacher is taken as it is); tv:/timm: get a new head.
        retrain = "" if t.name.startswith(ZOO_PREFIX) else \
            f", or set teacher.finetune=auto to fine-tune it with a new {data.num_classes}-class head"
        raise ConfigError(
            f"teacher.finetune=false uses the checkpoint {t.pretrained} as it is, but {found} and dataset "
            f"{cfg.dataset.name} has {data.num_classes}; give a checkpoint trained on the dataset's "
            f"{data.num_classes} classes{retrain}"
        )
    return False


def _checkpoint_classes(cfg: Config, data: Data) -> int | None:
    """`checkpoint_classes` of the teacher's checkpoint, cached per file version (the key of the
    teacher directory asks for it every time a path is built)."""
    t = cfg.teacher
    path = Path(t.pretrained).expanduser()
    try:
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None  # read_state_dict names the missing file
    return _classes_of(t.name, t.width, str(path), version, data.num_classes, data.in_channels, data.image_size)


@functools.lru_cache(maxsize=16)
def _classes_of(
    name: str, width: float, path: str, version: tuple[int, int] | None, num_classes: int, in_channels: int, image_size: int
) -> int | None:
    """The build (untrained, to find the classifier's key) draws its init from a forked RNG, so
    asking never changes a seeded run."""
    del version  # part of the cache key only
    with torch.random.fork_rng(devices=[]):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    # The reader of the model's own loader: the published zoo files keep tensors beside "model"
    # ("accuracy"), which read_state_dict would take for the state dict itself.
    state = read_zoo_checkpoint(path) if name.startswith(ZOO_PREFIX) else read_state_dict(path, name)
    return checkpoint_classes(model, state)
