"""`train.compile`: torch.compile for the training step (issue 19 item 4).

What is compiled is the module the step calls (a Distiller: its forward_train with every loss
term), compiled in place with `nn.Module.compile` before DDP wraps it, as torch's "Where to apply
torch.compile?" advises for DDP. In place, so the state dict keeps its keys (checkpoints and saved
weights do not change) and `forward_eval`, which evaluation calls directly, stays eager.

- On CUDA the mode is "reduce-overhead": CUDA graphs, which need static shapes, and the loop's
  shapes are static (it drops the last partial batch). Autograd's backward is compiled and
  graphed with it. CUDA graph trees start a new step at each forward when no backward is
  pending, which is the loop's order (forward, backward, optimizer step). Where torch cannot
  graph a part (an input mutated in place, say), it runs that part without CUDA graphs and says
  so in a warning. None of this has run: no GPU has been lent to this project.
- On the CPU the default mode (Inductor's C++ kernels; needs a C++ compiler).

`auto` is off everywhere. On the CPU it did not pay (docs/performance.md, "torch.compile"); on a
GPU it has not been measured, since no GPU has been lent to this project. `make gpu-check`
measures it (its `compile` part); auto should become "on for CUDA" only once such a measurement
shows that it pays.

It changes float summation order (fused kernels), not the arithmetic: metrics agree with eager
to float tolerance (tests/test_compile.py), and it is not part of the run key, like the device.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from common.errors import ConfigError

log = logging.getLogger("kd")
CUDA_MODE = "reduce-overhead"  # CUDA graphs: one launch per graph instead of one per kernel
CPU_MODE = "default"


def compile_mode(setting: bool | str, device: torch.device) -> str | None:
    """The torch.compile mode `setting` gives on `device`; None: the step runs eagerly."""
    if setting is not True:  # auto: off until a GPU measurement shows it pays (module docstring)
        return None
    return CUDA_MODE if device.type == "cuda" else CPU_MODE


def compile_training_step(model: nn.Module, setting: bool | str, device: torch.device, announce: bool = True) -> str | None:
    """Compile `model`'s call in place when `setting` says so; the mode used (None: eager).

    Nothing is built here: torch.compile traces and builds at the first step (tens of seconds,
    hence the log line), where `compile_errors` turns a failed build into one line.
    """
    mode = compile_mode(setting, device)
    if mode is not None:
        model.compile(mode=mode)
        if announce:
            log.info("train.compile=true: torch.compile (mode %s) builds the training step at its first call", mode)
    return mode


@contextlib.contextmanager
def compile_errors(mode: str | None) -> Iterator[None]:
    """A failed torch.compile build (no C++ compiler on the CPU, no Triton on CUDA) as one
    ConfigError line. Only the backend's failure (BackendCompilerFailed) is caught: an error
    raised by the model's own code is not one, and raises unchanged."""
    if mode is None:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed  # loaded with torch.compile, so only here

    try:
        yield
    except BackendCompilerFailed as exc:
        cause = _first_line(exc)
        raise ConfigError(
            f"train.compile=true: torch.compile (mode {mode}) could not build the training step ({cause}); "
            "install what it names (a C++ compiler on the CPU, Triton on CUDA) or set train.compile=false"
        ) from None


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message` of what the backend raised, unwrapped (BackendCompilerFailed
    around InductorError around InvalidCxxCompiler)."""
    inner = exc
    while getattr(inner, "inner_exception", None) is not None:
        inner = inner.inner_exception
    text = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__
