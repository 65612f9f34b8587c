"""Projectors and feature layouts shared by the projector-based methods (METHOD 8.1-8.2).

Layout (METHOD 8.1, 8.2): every distilled feature is brought to *channels first* before
projection. A pair uses 2-D projectors when both features are CNN maps or vectors, and 1-D
(Conv1d over the token axis) when either side is a transformer feature:
  CNN map (B, C, H, W):  kept (2-D)            | (B, C, H*W) (1-D)
  vector  (B, D):        (B, D, 1, 1) (2-D)    | (B, D, 1) (1-D)
  tokens  (B, T, D):     -                     | (B, D, T): channels = hidden dim, all tokens kept
Per-sample shapes are recognised by rank: (C, H, W) map, (T, D) tokens, (D,) vector.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.methods.losses import adaptive_avg_pool, pooled_side
from common.registry import Registry

Shape = tuple[int, ...]  # per-sample feature shape: (C, H, W), (T, D) or (D,), told apart by rank
ProjectorBuilder = Callable[[int, int, int], nn.Module]  # (c_in, c_out, spatial_dims) -> module

PROJECTORS: Registry[ProjectorBuilder] = Registry("projector")

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BATCHNORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


@PROJECTORS.register("conv1x1")
def conv1x1(c_in: int, c_out: int, spatial_dims: int) -> nn.Module:
    """SingleLayerConv (METHOD 8.2): one bias-free 1x1 convolution, PyTorch default init."""
    return _CONV[spatial_dims](c_in, c_out, kernel_size=1, bias=False)


@PROJECTORS.register("three_layer")
def three_layer(c_in: int, c_out: int, spatial_dims: int) -> nn.Module:
    """ThreeLayerConv (METHOD 8.2, SemCKD/SimKD style):
    Conv1x1(c_in -> 2c_out)-BN-ReLU-Conv3x3(2c_out -> 2c_out, pad 1)-BN-ReLU-Conv1x1(2c_out -> c_out), no biases.
    """
    conv, bn, mid = _CONV[spatial_dims], _BATCHNORM[spatial_dims], 2 * c_out
    return nn.Sequential(
        conv(c_in, mid, kernel_size=1, bias=False),
        bn(mid),
        nn.ReLU(),
        conv(mid, mid, kernel_size=3, padding=1, bias=False),
        bn(mid),
        nn.ReLU(),
        conv(mid, c_out, kernel_size=1, bias=False),
    )


@PROJECTORS.register("none")
def identity(c_in: int, c_out: int, spatial_dims: int) -> nn.Module:
    """No projector: the student feature is compared as is (channels must match)."""
    return nn.Identity()


# ----------------------------------------------------------------------------- layouts


def spatial_dims(student_shape: Shape, teacher_shape: Shape) -> int:
    """1 when either per-sample shape is transformer tokens (T, D), else 2 (METHOD 8.2)."""
    return 1 if 2 in (len(student_shape), len(teacher_shape)) else 2


def channels_first_shape(shape: Shape, dims: int) -> Shape:
    """Per-sample shape after `to_channels_first` (see the module docstring)."""
    if len(shape) == 1:
        return (shape[0],) + (1,) * dims
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 3:
        return shape if dims == 2 else (shape[0], shape[1] * shape[2])
    raise ConfigError(f"feature shape {shape} is not supported; distil layers shaped (C,H,W), (T,D) or (D,)")


def to_channels_first(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Batch version of `channels_first_shape` (ViT tokens permuted, METHOD 8.1)."""
    if x.dim() == 2:
        return x.reshape(*x.shape, *(1,) * dims)
    if x.dim() == 3:
        return x.transpose(1, 2)
    if x.dim() == 4:
        return x if dims == 2 else x.flatten(2)
    raise ValueError(f"feature of shape {tuple(x.shape)} is not (B,C,H,W), (B,T,D) or (B,D)")


def from_channels_first(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Inverse of `to_channels_first` for a feature meant to look like per-sample `shape`.

    Spatial sizes may be smaller than `shape`'s (a pooled teacher size); used to feed a projected
    student feature into a copy of the teacher's head (SimKD).
    """
    if len(shape) == 1:
        return x.reshape(x.shape[0], x.shape[1])
    if len(shape) == 2:
        return x.transpose(1, 2)
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], *shape[1:])


def _fmt(shape: Shape) -> str:
    return "x".join(str(s) for s in shape)


class PairAdapter(nn.Module):
    """One (student layer, teacher layer) pair: layout, pooling rule and projector (METHOD 8.2).

    `forward(student, teacher)` returns (prediction, target) in channels-first layout; the student
    is pooled to the teacher's size *before* projection when it is larger; a larger teacher map
    is pooled by `feature_mse` (pooling commutes with the 1x1 projector and the target is
    detached, so the result is the reference's).
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, projector: str, label: str) -> None:
        super().__init__()
        self.dims = spatial_dims(student_shape, teacher_shape)
        student_cf = channels_first_shape(tuple(student_shape), self.dims)
        teacher_cf = channels_first_shape(tuple(teacher_shape), self.dims)
        try:
            self.pooled = pooled_side(student_cf[1:], teacher_cf[1:])
        except ValueError:
            raise ConfigError(
                f"{label}: student map {_fmt(student_cf[1:])} and teacher map {_fmt(teacher_cf[1:])} cannot be "
                "aligned by pooling (one must be at least as large in every dim); pick other layers"
            ) from None
        if projector == "none" and student_cf[0] != teacher_cf[0]:
            raise ConfigError(
                f"method.projector=none needs equal channels, but {label} has {student_cf[0]} vs "
                f"{teacher_cf[0]}; use method.projector=conv1x1"
            )
        self.teacher_size = teacher_cf[1:]
        self.projector = PROJECTORS.get(projector)(student_cf[0], teacher_cf[0], self.dims)

    def project_student(self, student: torch.Tensor) -> torch.Tensor:
        """P(pool(F_s)): the student feature in the teacher's channel space, channels first."""
        student = to_channels_first(student, self.dims)
        if self.pooled == "student":
            student = adaptive_avg_pool(student, self.teacher_size)
        return self.projector(student)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project_student(student), to_channels_first(teacher.detach(), self.dims)
