"""The fused BN fold's division by the BN scale: the same values and gradients as autograd's
own ``y / d``, bit for bit (it only saves other tensors)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.nn.fused import divide_by_channel


def _grads(fn, y, d, grad):
    y, d = y.clone().requires_grad_(True), d.clone().requires_grad_(True)
    out = fn(y, d)
    out.backward(grad)
    return out.detach(), y.grad, d.grad


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(4, 3, 5, 5), (2, 8, 7), (3, 6), (2, 4, 3, 3, 3)]),
    magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
)
def test_values_and_gradients_are_autograds_bit_for_bit(seed, shape, magnitude):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=generator) * magnitude
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    d = (torch.rand(view, generator=generator) + 1e-3) * torch.randn(view, generator=generator)
    grad = torch.randn(shape, generator=generator)
    ours = _grads(divide_by_channel, y, d, grad)
    reference = _grads(torch.div, y, d, grad)
    for a, b in zip(ours, reference, strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_the_gradients_asked_for(needs):
    y = torch.randn(2, 3, 4, requires_grad=needs[0])
    d = (torch.rand(1, 3, 1) + 0.5).requires_grad_(needs[1])
    divide_by_channel(y, d).sum().backward()
    assert (y.grad is not None) == needs[0] and (d.grad is not None) == needs[1]
    torch.testing.assert_close(divide_by_channel(y, d), y / d, rtol=0, atol=0)
