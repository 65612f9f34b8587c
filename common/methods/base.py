"""The method interface: the registries, validation and the Distiller base class (METHOD 8, 9).

A *method* is a preset MethodSpec (all fields set; declared torch-free in common/method_spec.py,
so that config.py can derive the `method:` section from it) plus the Distiller class that runs
it. The training loop only calls the Distiller (`forward_train`) and `forward_eval`; everything
method-specific (projectors, attention MLPs, a teacher-head copy) lives inside the Distiller, so
the optimiser picks it up through `distiller.parameters()` (METHOD 8.7: one AdamW over all
trainable modules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import CRITERIA
from common.errors import ConfigError
from common.layers.hooks import forward_with_features
from common.layers.pairing import STUDENT_MAPS
from common.methods.crd_loss import CRD_N_NEGATIVES
from common.methods.dkd_loss import DKD_ALPHA, DKD_BETA_DEFAULT, DKD_WARMUP_EPOCHS, dkd_loss, dkd_warmup
from common.methods.losses import kd_loss
from common.method_spec import MethodSpec
from common.methods.projectors import PROJECTORS, Shape
from common.registry import Registry

# "selected": stage 1's selection; a criterion: the profile's top-k by it; "baseline": the
# teacher's baseline list (METHOD 7). Stage 2 turns a word into indices with
# common.profile.manifest.Manifest.teacher_layers.
LOGIT_LOSSES = ("kd", "dkd")  # MethodSpec.logit_loss: Hinton's KD, or decoupled KD (dkd_loss.py)
TEACHER_LAYER_WORDS = ("selected", "baseline", *CRITERIA)
# The student-layer maps (common/layers/pairing.py): "baseline", "depth", "Q".
STUDENT_LAYER_WORDS = STUDENT_MAPS


# ----------------------------------------------------------------------------- mappings (8.3)


@dataclass(frozen=True)
class Pair:
    student: int  # position in the distiller's student layer list
    teacher: int  # position in the teacher layer list
    weight: float


def one2one_pairs(n_student: int, n_teacher: int) -> list[Pair]:
    """One2One (METHOD 8.3): the i-th student layer with the i-th teacher layer, weight 1."""
    if n_student != n_teacher:
        raise ConfigError(
            f"method.mapping=one2one pairs layers in order but got {n_student} student and {n_teacher} "
            "teacher layers; give equally many or use method.mapping=full"
        )
    return [Pair(i, i, 1.0) for i in range(n_student)]


def full_pairs(n_student: int, n_teacher: int) -> list[Pair]:
    """FullyConnected (METHOD 8.3): every student layer with every teacher layer, weight 1/n_teacher."""
    return [Pair(s, t, 1.0 / n_teacher) for s in range(n_student) for t in range(n_teacher)]


MAPPINGS: dict[str, Callable[[int, int], list[Pair]]] = {"one2one": one2one_pairs, "full": full_pairs}


# ----------------------------------------------------------------------------- feature terms


@dataclass(frozen=True)
class FeatureContext:
    """What a feature-term builder gets: the resolved layers, their per-sample shapes, the pairs,
    and for terms that keep per-sample state (CRD's memory bank) the training rows and labels."""

    spec: MethodSpec
    student_layers: list[int]
    teacher_layers: list[int]
    student_shapes: list[Shape]
    teacher_shapes: list[Shape]
    pairs: list[Pair]
    batch_size: int | None
    train_rows: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None

    def label(self, pair: Pair) -> str:
        return f"student layer {self.student_layers[pair.student]} / teacher layer {self.teacher_layers[pair.teacher]}"


# A feature term maps (student features, teacher features, step), the features lists in layer
# order and `step` the loop's Step (None outside the loop), to the unweighted feature loss. Registered by `spec.feature_loss`; "none" builds nothing.
FeatureTermBuilder = Callable[[FeatureContext], "nn.Module | None"]
FEATURE_LOSSES: Registry[FeatureTermBuilder] = Registry("feature loss")
FEATURE_LOSSES.register("none", lambda context: None)


# ----------------------------------------------------------------------------- validation


def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"method.{key} is {value!r}; allowed values: {', '.join(allowed)}")


def _check_layers(key: str, value: object, words: Sequence[str]) -> None:
    if isinstance(value, str):
        _check_choice(key, value, words)
    elif not (isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"method.{key} is {value!r}; use {' or '.join(words)} or a non-empty list of layer indices")


def validate_spec(spec: MethodSpec) -> None:
    """Raise ConfigError (naming the key and the allowed values) for any bad or inconsistent field."""
    for key in ("ce_weight", "kd_weight", "feature_weight", "dkd_alpha", *(("dkd_beta",) if spec.dkd_beta is not None else ())):
        value = getattr(spec, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"method.{key} is {value!r}; it must be a finite number >= 0")
    if not spec.kd_temperature > 0:
        raise ConfigError(f"method.kd_temperature is {spec.kd_temperature!r}; it must be > 0")
    _check_choice("feature_loss", spec.feature_loss, FEATURE_LOSSES.names())
    _check_choice("logit_loss", spec.logit_loss, LOGIT_LOSSES)
    for key, least in (("dkd_warmup", 0), ("crd_negatives", 1)):
        value = getattr(spec, key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise ConfigError(f"method.{key} is {value!r}; it must be an integer >= {least}")
    _check_choice("mapping", spec.mapping, sorted(MAPPINGS))
    _check_choice("projector", spec.projector, PROJECTORS.names())
    if spec.feature_loss == "none":
        for key in ("teacher_layers", "student_layers"):
            if getattr(spec, key) != ():
                raise ConfigError(f"method.{key} has no effect with method '{spec.name}' (no feature loss); remove it")
        for key in ("detach_head", "teacher_head"):
            if getattr(spec, key):
                raise ConfigError(f"method.{key} needs a feature loss, which method '{spec.name}' has not; set it false")
    else:
        _check_layers("teacher_layers", spec.teacher_layers, TEACHER_LAYER_WORDS)
        _check_layers("student_layers", spec.student_layers, STUDENT_LAYER_WORDS)
    rules = [
        (spec.feature_loss in ("sp", "sp_ref") and spec.projector != "none", f"method.projector must be none for feature loss {spec.feature_loss}"),
        (spec.logit_loss == "dkd" and spec.kd_standardize, "method.kd_standardize does not apply to dkd; set it false"),
        (spec.feature_loss == "crd" and (spec.mapping != "one2one" or spec.projector != "none"),
         "feature loss crd embeds one layer pair itself: method.mapping must be one2one and method.projector none"),
        (spec.feature_loss == "semckd" and spec.mapping != "full", "method.mapping must be full for feature loss semckd (attention over all pairs)"),
        (spec.teacher_head and spec.feature_loss != "mse", "teacher_head (SimKD) needs feature loss mse"),
        (spec.teacher_head and spec.mapping != "one2one", "method.mapping must be one2one with teacher_head (SimKD)"),
        (spec.teacher_head and spec.detach_head, "method.detach_head must be false with teacher_head (SimKD)"),
        (spec.detach_head and spec.feature_weight == 0, "method.detach_head with feature_weight 0 leaves the backbone untrained; set method.feature_weight > 0"),
        (spec.ce_weight == 0 and spec.kd_weight == 0 and (spec.feature_loss == "none" or spec.feature_weight == 0), "every loss weight of the method is 0; set method.ce_weight, kd_weight or feature_weight > 0"),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(f"{message} (method '{spec.name}')")


# ----------------------------------------------------------------------------- distiller


@dataclass(frozen=True)
class Step:
    """Where a training batch comes from: the loop hands it to every method, whichever uses it
    (CRD's memory bank needs the batch's dataset rows, DKD's warm-up the epoch)."""

    indices: torch.Tensor  # (B,) rows of the training split, on the batch's device
    epoch: int  # 1-based


@dataclass(frozen=True)
class BuildContext:
    """Everything `build_distiller` knows beyond the spec, handed to the Distiller class."""

    num_classes: int
    input_shape: tuple[int, int, int]
    student_layers: list[int]
    teacher_layers: list[int]
    student_shapes: list[Shape]
    teacher_shapes: list[Shape]
    teacher: nn.Module | None
    batch_size: int | None
    train_rows: torch.Tensor | None = None  # the training rows' dataset indices (CRD's memory bank)
    train_labels: torch.Tensor | None = None  # labels of the whole training split (CRD's negatives)


class Distiller(nn.Module):
    """Student + method modules; computes the method's weighted losses (METHOD 8.1).

    Logits come from the student's own forward. With `detach_head` the forward is split at the
    deepest distilled student layer d (METHOD 8.1 SeperateLinear): the features up to d keep
    their graph for the feature loss, while the head (every module after d) sees a detached
    copy, so CE / KD train the head only.
    """

    def __init__(self, spec: MethodSpec, student: nn.Module, feature_term: nn.Module | None, context: BuildContext) -> None:
        super().__init__()
        self.spec = spec
        self.student = student
        self.feature_term = feature_term
        self.student_layers: list[int] = list(context.student_layers)
        self.teacher_layers: list[int] = list(context.teacher_layers)
        self.detach_after: int | None = max(self.student_layers) if spec.detach_head else None

    # -- pieces subclasses may override

    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, features of `student_layers` in order)."""
        if not self.student_layers:
            return self.student(images), []
        logits, features = forward_with_features(self.student, images, self.student_layers, detach_after=self.detach_after)
        return logits, [features[i] for i in self.student_layers]

    def forward_eval(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time logits."""
        return self.student(images)

    def check_rows(self, rows: torch.Tensor) -> None:
        """Raise if a method keeps per-row state (CRD's memory bank) that lacks some of the dataset
        rows `rows` a run draws its batches from. The loop calls it once at setup, on the host, so
        that no step needs to check its batch (a host read per step on a GPU)."""
        check = getattr(self.feature_term, "check_rows", None)
        if check is not None:
            check(rows)

    # -- the interface used by the training loop

    def forward_train(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teacher_features: dict[int, torch.Tensor],
        teacher_logits: torch.Tensor | None,
        step: Step | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits for train accuracy, {loss name: weighted scalar}); the loop sums the values.
        `step` is what the loop knows of the batch; the methods that need it say so when it is missing."""
        logits, student_features = self.student_forward(images)
        losses = self.logit_losses(logits, labels, teacher_logits, step)
        if self.feature_term is not None and self.spec.feature_weight > 0:
            term = self.feature_term(student_features, self.ordered_teacher_features(teacher_features), step)
            losses["feat"] = self.spec.feature_weight * term
        return logits, losses

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teacher_features: dict[int, torch.Tensor],
        teacher_logits: torch.Tensor | None,
        step: Step | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward_train` as the module's call, so that DistributedDataParallel sees the step."""
        return self.forward_train(images, labels, teacher_features, teacher_logits, step)

    def logit_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, step: Step | None = None
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self.spec.ce_weight > 0:
            losses["ce"] = self.spec.ce_weight * F.cross_entropy(logits.float(), labels)
        if self.spec.needs_teacher_logits:
            if teacher_logits is None:
                raise ValueError(f"method '{self.spec.name}' uses KD: pass teacher_logits to forward_train")
            if self.spec.logit_loss == "dkd":
                if step is None:
                    raise ValueError(f"method '{self.spec.name}' warms DKD up by epoch: pass step= to forward_train")
                beta = self.spec.dkd_beta if self.spec.dkd_beta is not None else DKD_BETA_DEFAULT
                warm = dkd_warmup(step.epoch, self.spec.dkd_warmup)
                losses["dkd"] = self.spec.kd_weight * warm * dkd_loss(
                    logits, teacher_logits.detach(), labels, self.spec.dkd_alpha, beta, self.spec.kd_temperature
                )
            else:
                losses["kd"] = self.spec.kd_weight * kd_loss(
                    logits, teacher_logits.detach(), self.spec.kd_temperature, self.spec.kd_standardize
                )
        return losses

    def ordered_teacher_features(self, teacher_features: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        missing = [i for i in self.teacher_layers if i not in teacher_features]
        if missing:
            raise ValueError(f"teacher features for layers {missing} are missing (got {sorted(teacher_features)})")
        return [teacher_features[i].detach() for i in self.teacher_layers]


@dataclass(frozen=True)
class MethodPreset:
    spec: MethodSpec
    distiller: type[Distiller]
    summary: str  # one line for `stage2_distill.py --list-methods`: what it is and where its weights come from


METHODS: Registry[MethodPreset] = Registry("method")


def register_method(distiller: type[Distiller] = Distiller, *, summary: str, **fields_: object) -> MethodSpec:
    """Register a preset; the spec is validated now so a bad preset fails at import."""
    spec = MethodSpec(**fields_)  # type: ignore[arg-type]
    validate_spec(spec)
    METHODS.register(spec.name, MethodPreset(spec, distiller, summary))
    return spec


# Defaults shared by the presets; each preset states only what differs (METHOD 9 catalogue).
NO_FEATURES: dict[str, object] = dict(
    ce_weight=1.0, kd_weight=0.0, kd_temperature=4.0, kd_standardize=False, feature_loss="none",
    feature_weight=0.0, teacher_layers=(), student_layers=(), mapping="one2one",
    projector="none", detach_head=False, teacher_head=False, logit_loss="kd",
    # DKD's and CRD's published values (sources in dkd_loss.py / crd_loss.py); used only by those.
    dkd_alpha=DKD_ALPHA, dkd_beta=None, dkd_warmup=DKD_WARMUP_EPOCHS, crd_negatives=CRD_N_NEGATIVES,
)
FEATURE_BASE: dict[str, object] = dict(
    NO_FEATURES, feature_loss="mse", feature_weight=1.0, teacher_layers="baseline",
    student_layers="baseline", projector="conv1x1",
)
# Hinton et al. 2015 scale the soft-target KL by T^2 so its gradients keep their size as T grows;
# T = 4 with weight T^2 = 16 is the paper under study's LGLossWeight (METHOD 8.4, 9).
KD_T4 = dict(kd_weight=16.0, kd_temperature=4.0)
