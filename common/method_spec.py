"""MethodSpec: a distillation method with every hyperparameter set (METHOD 9).

The one declaration of a method's hyperparameters. The `method:` section of a config,
`common.config.MethodConfig`, is derived from these fields (each an optional override of the
preset's value), so a new hyperparameter is a field here, its default in the presets
(`common.methods.base.NO_FEATURES`) and, if its values are restricted, a rule in
`common.methods.base.validate_spec`. Torch-free, because config.py is: stage 3 and the study
read configs without loading torch.
"""
from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

# Field metadata key: the preset fixes this field; a config cannot override it. feature_loss and
# teacher_head choose the method family and with it the Distiller class of the preset, so a
# config picks them through `method.name`.
PRESET_ONLY = "preset_only"
# Field metadata key: the field came after run directories existed; at this value (what every
# earlier run had) it is left out of the run hash (`hashed_fields`), so those runs are found again.
ADDED_AT = "added_at"


def _preset_only(**added: Any) -> Any:
    return field(metadata={PRESET_ONLY: True, **({ADDED_AT: added["at"]} if added else {})})


def _added(at: Any) -> Any:
    return field(metadata={ADDED_AT: at})


@dataclass(frozen=True)
class MethodSpec:
    """A fully resolved method (METHOD 9): every field set. See common/methods/__init__.py."""

    name: str  # the preset (METHODS); a config selects it with method.name
    ce_weight: float  # CE on the logits (for detach_head methods it only trains the head)
    kd_weight: float  # vanilla KD weight (16 for T = 4); 0 = off
    kd_temperature: float
    kd_standardize: bool  # logit standardisation (METHOD 8.4)
    feature_loss: str = _preset_only()  # none | mse | sp | sp_ref | semckd
    feature_weight: float
    teacher_layers: str | tuple[int, ...]  # a word of methods.base.TEACHER_LAYER_WORDS | explicit; () without a feature loss
    student_layers: str | tuple[int, ...]  # a map of layers.pairing.STUDENT_MAPS (baseline | depth | Q) | explicit; () without a feature loss
    mapping: str  # one2one | full
    projector: str  # conv1x1 | three_layer | none
    detach_head: bool  # METHOD 8.1 SeperateLinear: no logit loss reaches the backbone
    teacher_head: bool = _preset_only()  # SimKD: logits from a trainable copy of the teacher's modules after its last distilled layer
    logit_loss: str = _preset_only(at="kd")  # kd (Hinton, `kd_weight` x KL at `kd_temperature`) | dkd (decoupled KD)
    dkd_alpha: float = _added(at=1.0)  # DKD's TCKD weight (dkd only)
    dkd_beta: float | None = _added(at=None)  # DKD's NCKD weight; None: the DKD paper's value for the teacher/student pair (dkd only)
    dkd_warmup: int = _added(at=20)  # epochs of DKD's linear warm-up of the logit loss; 0: none (dkd only)
    crd_negatives: int = _added(at=16384)  # CRD's negatives per sample from the memory bank (feature loss crd only)

    # What the method takes from the teacher, declared once here; stage 2 builds only that.
    @property
    def needs_teacher_features(self) -> bool:
        return self.feature_loss != "none"

    @property
    def needs_teacher_logits(self) -> bool:
        return self.kd_weight > 0

    @property
    def needs_teacher_model(self) -> bool:
        """SimKD copies the teacher's modules after its last distilled layer into the student."""
        return self.teacher_head

    @property
    def reads_profile(self) -> bool:
        """Whether stage 2 reads stage 1's profile: teacher layers named by a profile word
        (`selected`, a criterion). A method without teacher layers (ce, kd, dkd), or with the
        baseline's or an explicit list, never does, so the profile's settings are not checked for it."""
        uses_layers = self.needs_teacher_features or self.needs_teacher_model
        return uses_layers and isinstance(self.teacher_layers, str) and self.teacher_layers != "baseline"

    @property
    def needs_teacher(self) -> bool:
        """Any knowledge from the teacher; a method without it is the CE student baseline
        (METHOD 8.7: it trains at the model's CE learning rate, every other method at the KD one)."""
        return self.needs_teacher_features or self.needs_teacher_logits or self.needs_teacher_model


SPEC_FIELDS = tuple(f.name for f in fields(MethodSpec))


def hashed_fields(spec: MethodSpec) -> dict[str, Any]:
    """The spec as a run's hash sees it: every field, except a later-added one at the value all
    earlier runs had (ADDED_AT), so adding a hyperparameter does not orphan finished runs."""
    out = asdict(spec)
    for f in fields(spec):
        if ADDED_AT in f.metadata and out[f.name] == f.metadata[ADDED_AT]:
            del out[f.name]
    return out


def override_fields() -> list[Field[Any]]:
    """The hyperparameters a config may override (`method.<key>=...`), in declaration order:
    every field but the preset's name and the PRESET_ONLY ones."""
    return [f for f in fields(MethodSpec) if f.name != "name" and not f.metadata.get(PRESET_ONLY)]
