"""The exported files: the student written as ONNX and as TorchScript, each loaded back and
checked against PyTorch's logits before it replaces an older file.

Opset 18: what torch.onnx's exporter (torch.export + onnxscript) emits without a version
conversion, and what ONNX Runtime has run since 1.14 (including its mobile builds). When a model
does not convert, `_failing_part` names the smallest submodule that fails on its own, so the error
says what to rewrite. `common.export.runner` decides which runs to export and records the result.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from common.errors import ExportError
from common.files import atomic_write

if TYPE_CHECKING:  # torch and ONNX load only when a run is exported
    import torch
    from torch import nn

log = logging.getLogger("kd")

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def write_onnx(model: "nn.Module", example: "torch.Tensor", path: Path, images: "torch.Tensor", reference: "torch.Tensor",
               tolerance: float, threads: int, what: str, metadata: dict[str, str]) -> dict[str, Any]:
    """Export `model` (batch axis dynamic, traced on `example`) to `path` with `metadata` in the
    ONNX metadata; written only once ONNX Runtime's logits on `images` agree with `reference`
    within `tolerance` (`agreement`, whose numbers are returned). `what` names the model in errors."""
    import onnx
    import torch

    from common.export import latency

    def convert(module: "nn.Module", args: tuple, kwargs: dict, dynamic: bool) -> Any:
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")  # exporter notes on every call, none about the result
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            return torch.onnx.export(module, args, None, kwargs=kwargs or None, dynamo=True, opset_version=OPSET,
                                     input_names=[INPUT_NAME] if dynamic else None, output_names=[OUTPUT_NAME] if dynamic else None,
                                     dynamic_shapes=shapes, external_data=False, verbose=False)

    try:
        program = convert(model, (example,), {}, True)
    except Exception as exc:
        log.info("%s does not export to ONNX; converting its parts one by one to find the one that fails", what)
        part = _failing_part(model, example, lambda m, a, k: convert(m, a, k, False))
        raise ExportError(f"{what} does not export to ONNX (opset {OPSET}): {part} fails: {_root_cause(exc)}; "
                          f"rewrite that part with exportable ops, or leave this run out with --pairs / --methods") from None
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    check: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        session = latency.onnxruntime_session(tmp, threads)
        outputs = torch.cat([torch.from_numpy(session.run(None, {INPUT_NAME: chunk.numpy()})[0]) for chunk in images.split(256)])
        check.update(agreement(outputs, reference, tolerance, f"{what}: ONNX Runtime"))

    atomic_write(path, write)
    return check


def write_torchscript(model: "nn.Module", example: "torch.Tensor", path: Path, images: "torch.Tensor",
                      reference: "torch.Tensor", tolerance: float, what: str) -> dict[str, Any]:
    """`model` traced on `example` (torch.jit.trace) and saved to `path`, written only once the
    loaded file's logits on `images` agree with `reference` within `tolerance` (`agreement`)."""
    import torch

    def trace(module: "nn.Module", args: tuple, kwargs: dict) -> Any:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int notes; the file is checked below
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated since torch 2.14; LibTorch still loads it
            # check_trace=False: its re-trace compares graphs by mangled class names and fails on equal graphs.
            return torch.jit.trace(module, args, example_kwarg_inputs=kwargs or None, check_trace=False)

    try:
        traced = trace(model, (example,), {})
    except Exception as exc:
        log.info("%s does not trace; tracing its parts one by one to find the one that fails", what)
        part = _failing_part(model, example, trace)
        raise ExportError(f"{what} does not trace to TorchScript: {part} fails: {_root_cause(exc)}; "
                          f"rewrite that part, or leave this run out with --pairs / --methods") from None
    check: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # as in trace() above
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        with torch.inference_mode():
            outputs = torch.cat([loaded(chunk) for chunk in images.split(256)])
        check.update(agreement(outputs, reference, tolerance, f"{what}: TorchScript"))

    atomic_write(path, write)
    return check


def agreement(outputs: "torch.Tensor", reference: "torch.Tensor", tolerance: float, what: str) -> dict[str, Any]:
    """Max abs logit difference and top-1 agreement; an ExportError beyond `tolerance`."""
    diff = float((outputs.float() - reference).abs().max())
    agree = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(f"{what} logits differ from PyTorch's by {diff:.3g} on {len(reference)} test images "
                          f"(tolerance {tolerance:.3g}); the file was not written (an earlier one is kept)")
    return {"images": len(reference), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": tolerance}


def _failing_part(model: "nn.Module", example: "torch.Tensor", convert: Callable[["nn.Module", tuple, dict], Any]) -> str:
    """The smallest submodule that does not convert on its own, found from the root down: the
    children that ran in one forward are converted with the inputs they got, in registration
    order (the call order of the registry's sequential models), and the search descends into
    the first that fails; a part none of whose children fail holds the op in its own forward.
    Runs only after a failed export, so its extra conversions cost nothing on success."""
    import torch

    inputs: dict[str, tuple[tuple, dict]] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            if name not in inputs:
                clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                inputs[name] = (tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()})
        return hook

    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        return f"the forward itself ({_root_cause(exc)})"
    finally:
        for h in hooks:
            h.remove()
    path, module = "", model
    while True:
        for name, child in module.named_children():
            full = f"{path}.{name}" if path else name
            if full not in inputs:
                continue
            try:
                convert(child, *inputs[full])
            except Exception:
                path, module = full, child
                break
        else:
            break
    return f"part '{path}' ({type(module).__name__})" if path else f"the model's own forward ({type(model).__name__})"


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error: the exporters wrap the op's own message twice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The exporter logs each step at INFO and its optimiser's skipped folds as warnings; `cli.main`
    shows INFO, so these loggers are raised to ERROR for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
