"""Bit-exact agreement with torch.ao's FakeQuantize, used as the reference oracle.

Given the same encoding (our scale and zero point copied into its buffers, its observer off),
torch.ao must produce exactly our fake-quantized values and exactly our input gradients.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

from qat_lightning.quant import Quantizer, QuantScheme

FAST = settings(max_examples=50, deadline=None)

# (our scheme, torch.ao FakeQuantize arguments) pairs with the same code range.
PER_TENSOR = {
    "quint8": (
        QuantScheme(bits=8, symmetric=False, signed=False),
        dict(quant_min=0, quant_max=255, dtype=torch.quint8),
    ),
    "uint4": (
        QuantScheme(bits=4, symmetric=False, signed=False),
        dict(quant_min=0, quant_max=15, dtype=torch.quint8),
    ),
}
PER_CHANNEL = {
    "qint8": (
        QuantScheme(bits=8, granularity="per_channel", axis=0),
        dict(quant_min=-128, quant_max=127, dtype=torch.qint8),
    ),
    "int4": (
        QuantScheme(bits=4, granularity="per_channel", axis=0),
        dict(quant_min=-8, quant_max=7, dtype=torch.qint8),
    ),
}


def _oracle(kwargs: dict, per_channel: bool, ch_axis: int) -> FakeQuantize:
    if per_channel:
        fq = FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver,
            qscheme=torch.per_channel_symmetric,
            ch_axis=ch_axis,
            **kwargs,
        )
    else:
        fq = FakeQuantize(
            observer=MovingAverageMinMaxObserver, qscheme=torch.per_tensor_affine, **kwargs
        )
    fq.disable_observer()
    fq.enable_fake_quant()
    return fq


def _compare(ours: Quantizer, oracle: FakeQuantize, x: torch.Tensor) -> None:
    scale, zero_point = ours.encoding()
    oracle.scale = scale.clone().reshape(oracle.scale.shape if scale.dim() == 0 else -1)
    oracle.zero_point = zero_point.clone().reshape(
        oracle.zero_point.shape if zero_point.dim() == 0 else -1
    )
    upstream = torch.randn_like(x)
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y_ours = ours(x_ours)
    y_ref = oracle(x_ref)
    y_ours.backward(upstream)
    y_ref.backward(upstream)
    assert torch.equal(y_ours, y_ref)
    assert torch.equal(x_ours.grad, x_ref.grad)
    # Something was clipped and something was not: the comparison covered both branches.
    assert bool((x_ours.grad == 0).any()) and bool((x_ours.grad != 0).any())


def _data(seed: int, shape, magnitude: float, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * magnitude + torch.rand((), generator=g) * magnitude
    if outliers:  # certainly outside the calibrated range, on both sides
        x.view(-1)[:2] = torch.tensor([20.0, -20.0]) * magnitude
    return x


@pytest.mark.parametrize("name", sorted(PER_TENSOR))
@FAST
@given(seed=st.integers(0, 2**31 - 1), magnitude=st.sampled_from([0.01, 1.0, 50.0]))
def test_per_tensor_affine_matches_torch_ao(name, seed, magnitude):
    scheme, kwargs = PER_TENSOR[name]
    ours = Quantizer(scheme)
    with ours.compute_encodings():
        ours(_data(seed, (4, 33), magnitude))
    assert int(ours.encoding()[1]) > 0  # affine: a real zero point
    _compare(ours, _oracle(kwargs, False, 0), _data(seed + 1, (4, 33), magnitude, True))


@pytest.mark.parametrize("name", sorted(PER_CHANNEL))
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from([0.01, 1.0, 50.0]),
    axis=st.sampled_from([0, 1]),
)
def test_per_channel_symmetric_matches_torch_ao(name, seed, magnitude, axis):
    scheme, kwargs = PER_CHANNEL[name]
    scheme = scheme.replace(axis=axis)
    shape = (6, 5, 7)
    ours = Quantizer(scheme)
    with ours.compute_encodings():
        ours(_data(seed, shape, magnitude))
    assert ours.encoding()[0].shape == (shape[axis],)
    _compare(ours, _oracle(kwargs, True, axis), _data(seed + 1, shape, magnitude, True))


@pytest.mark.parametrize("name", sorted(PER_TENSOR))
@FAST
@given(seed=st.integers(0, 2**31 - 1), magnitude=st.sampled_from([0.01, 1.0, 50.0]))
def test_affine_minmax_encoding_matches_torch_ao_observer(name, seed, magnitude):
    # Affine min/max encodings use torch.ao's formula: scale = (max - min) / (qmax - qmin),
    # zero_point = qmin - round(min / scale), with the range stretched to include 0.
    scheme, kwargs = PER_TENSOR[name]
    x = _data(seed, (4, 33), magnitude)
    ours = Quantizer(scheme)
    with ours.compute_encodings():
        ours(x)
    observer = MinMaxObserver(qscheme=torch.per_tensor_affine, **kwargs)
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    assert torch.equal(ours.encoding()[0], scale.reshape(()))
    assert torch.equal(ours.encoding()[1], zero_point.reshape(()).to(torch.int32))
