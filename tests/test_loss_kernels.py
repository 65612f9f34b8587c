"""The faster kernels behind common/methods/losses.py compute the same numbers as the formulas they replace.

`adaptive_avg_pool` uses plain average pooling when the windows are whole and hold 2^j elements
(bit for bit the adaptive result, forward and backward); `feature_mse` is one `mse_loss` instead of the mean of
the per-sample means (equal up to float rounding, since every sample has as many elements).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.methods import losses as L


@pytest.mark.parametrize(
    "shape,size",
    [((3, 4, 8, 8), (4, 4)), ((3, 4, 8, 8), (2, 2)), ((3, 4, 32, 32), (8, 8)), ((3, 4, 16, 16), (2, 4)), ((3, 4, 8, 8), (1, 2))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_window_pooling_is_bitwise_adaptive_pooling(shape, size, dtype):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = torch.randn(shape[0], shape[1], *size, dtype=dtype)
    fast = L.adaptive_avg_pool(x, size)
    (grad_fast,) = torch.autograd.grad((fast * y).sum(), x)
    ref = F.adaptive_avg_pool2d(x, size)
    (grad_ref,) = torch.autograd.grad((ref * y).sum(), x)
    assert torch.equal(fast, ref)
    assert torch.equal(grad_fast, grad_ref)


def test_whole_window_pooling_1d_and_channels_last():
    tokens = torch.randn(2, 5, 16)
    assert torch.equal(L.adaptive_avg_pool(tokens, (4,)), F.adaptive_avg_pool1d(tokens, 4))
    maps = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(L.adaptive_avg_pool(maps, (4, 4)), F.adaptive_avg_pool2d(maps.contiguous(), 4))


@pytest.mark.parametrize(
    "shape,size",
    [((2, 3, 7, 7), (4, 4)), ((2, 3, 9, 6), (4, 4)), ((2, 3, 10), (4,)), ((2, 3, 6, 6), (2, 2)), ((2, 3, 8, 8), (1, 1)), ((2, 3, 16), (1,))],
)
def test_other_windows_keep_adaptive_pooling(shape, size):
    """Uneven windows, windows of 9 elements, a single output element: the adaptive kernel itself."""
    x = torch.randn(*shape)
    pool = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool1d
    assert torch.equal(L.adaptive_avg_pool(x, size), pool(x, size))


def test_same_size_is_returned_unchanged():
    x = torch.randn(2, 3, 4, 4)
    assert L.adaptive_avg_pool(x, (4, 4)) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "pred_shape,target_shape",
    [((4, 6, 8, 8), (4, 6, 4, 4)), ((4, 6, 2, 2), (4, 6, 4, 4)), ((4, 6, 4, 4), (4, 6, 4, 4)), ((4, 6, 10), (4, 6, 10)), ((4, 6), (4, 6))],
)
def test_feature_mse_is_the_batch_mean_of_the_per_sample_losses(dtype, pred_shape, target_shape):
    pred = torch.randn(*pred_shape, dtype=dtype, requires_grad=True)
    target = torch.randn(*target_shape, dtype=dtype)
    fast = L.feature_mse(pred, target)
    (grad_fast,) = torch.autograd.grad(fast, pred)
    ref = L.feature_mse_per_sample(pred, target).mean()
    (grad_ref,) = torch.autograd.grad(ref, pred)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(grad_fast, grad_ref, **tol)


def test_feature_mse_computes_low_precision_in_float32():
    pred = torch.randn(2, 3, 4, 4).bfloat16()
    target = torch.randn(2, 3, 4, 4)
    value = L.feature_mse(pred, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ((pred.float() - target) ** 2).mean())


def test_feature_mse_mixed_layouts():
    """A channels-last prediction (a channels-last student) against a contiguous teacher target."""
    pred = torch.randn(3, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    target = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(L.feature_mse(pred, target), L.feature_mse_per_sample(pred.contiguous(), target).mean())
