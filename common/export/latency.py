"""What a model costs on a CPU: parameters, MACs per image, and latency (median of repeated runs).

Used by common/export/runner.py for the export table. Timing rules, so numbers from two runtimes compare:
the same input tensor, the same number of intra-op threads for PyTorch and ONNX Runtime (default:
every core this process may use), `warmup` untimed calls first, then the median of `repeats`
timed calls (with the quartiles, to judge the noise of a shared machine). PyTorch runs eager, in
`torch.inference_mode`; each runtime is timed in a block of its own, since ONNX Runtime's
worker threads spin for a while after a call and would slow a PyTorch call interleaved with it.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the quartiles of the timed repeats."""

    median_ms: float
    q1_ms: float
    q3_ms: float

    def as_dict(self) -> dict[str, float]:
        return {"median": round(self.median_ms, 4), "q1": round(self.q1_ms, 4), "q3": round(self.q3_ms, 4)}


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def count_params(model: nn.Module) -> int:
    """Parameters (weights and biases), not buffers such as BatchNorm's running statistics."""
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU scaled-dot-product attention, missing from FlopCounterMode's table: Q K^T, then A V."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per image: FLOPs / 2 of `torch.utils.flop_counter.FlopCounterMode`
    for one forward of `example[:1]`.

    Counted: convolutions, linear layers and matrix products, attention's Q K^T and A V included
    (the CPU attention kernel is added to the counter's table). Not counted: normalisation,
    activations, pooling, additions. MultiheadAttention's fused inference path is turned off
    while counting, since the counter cannot see inside it.
    """
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    )
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def median_time(call: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """Median and quartiles, in ms, of `repeats` timed calls after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        call()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        call()
        times[i] = (time.perf_counter() - start) * 1e3
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Timing(float(median), float(q1), float(q3))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `threads` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_latency(model: nn.Module, images: torch.Tensor, threads: int, warmup: int, repeats: int) -> Timing:
    """Eager PyTorch on the CPU, eval mode, `torch.inference_mode`, `threads` intra-op threads."""
    model.eval()
    with torch_threads(threads), torch.inference_mode():
        return median_time(lambda: model(images), warmup, repeats)


def onnxruntime_session(path: str | os.PathLike, threads: int):
    """A CPU ONNX Runtime session with `threads` intra-op threads, one inter-op thread and every
    graph optimisation on (ORT's defaults otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-session optimiser chatter
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnxruntime_latency(session, images: np.ndarray, warmup: int, repeats: int) -> Timing:
    """ONNX Runtime on the CPU, with the thread count the session was built with."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(images, dtype=np.float32)}
    return median_time(lambda: session.run(None, feed), warmup, repeats)
