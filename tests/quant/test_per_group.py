"""Per-group quantization (groups of ``group_size`` along the last axis): numerics against a
float64 reference, LSQ gradients, validation, checkpoints and `QTensor` (hypothesis)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import QTensor, Quantizer, QuantScheme, fake_quantize
from qat_lightning.quant.grouped import GroupSizeError, group_shape
from qat_lightning.quant.observers import ChannelCountError


@st.composite
def grouped_cases(draw, learnable: bool = False):
    """A per-group scheme and a weight shape (out, groups * group_size)."""
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    scheme = QuantScheme(
        bits=bits,
        symmetric=symmetric,
        signed=symmetric or draw(st.booleans()),
        granularity="per_group",
        group_size=draw(st.sampled_from([1, 3, 8, 16, 32])),
        learnable=learnable,
    )
    out, groups = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    return scheme, (out, groups * scheme.group_size), draw(st.integers(0, 2**16))


def _weight(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], 1, generator=g) * 3 + 0.01  # rows of different magnitude
    return torch.randn(shape, generator=g) * scale


def _calibrated(scheme: QuantScheme, w: torch.Tensor) -> Quantizer:
    q = Quantizer(scheme, shape=tuple(w.shape))
    with q.compute_encodings():
        q(w)
    return q


def reference_fake_quant(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-group min/max fake quant in float64, written from the definition."""
    g = scheme.group_size
    rows = w.double().reshape(-1, g)
    mn = rows.amin(1).clamp(max=0.0)
    mx = rows.amax(1).clamp(min=0.0)
    if scheme.symmetric:
        amax = torch.maximum(-mn, mx) if scheme.signed else mx
        scale = (amax / scheme.qmax).clamp(min=torch.finfo(torch.float32).eps)
        zp = torch.zeros_like(scale)
    else:
        scale = ((mx - mn) / (scheme.qmax - scheme.qmin)).clamp(min=torch.finfo(torch.float32).eps)
        zp = (scheme.qmin - torch.round(mn / scale)).clamp(scheme.qmin, scheme.qmax)
    # float32 encodings, as the quantizer stores them
    scale = scale.float().double()
    codes = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], scheme.qmin, scheme.qmax)
    return ((codes - zp[:, None]) * scale[:, None]).reshape(w.shape), scale.reshape(
        group_shape(w.shape, g)
    )


@settings(max_examples=60, deadline=None)
@given(grouped_cases())
def test_codes_in_range_and_error_within_half_a_step(case):
    scheme, shape, seed = case
    w = _weight(shape, seed)
    q = _calibrated(scheme, w)
    assert q.scale.shape == group_shape(shape, scheme.group_size)
    qt = q.quantize(w)
    assert int(qt.codes.min()) >= scheme.qmin and int(qt.codes.max()) <= scheme.qmax
    step = qt.broadcast_encoding()[0]
    # min/max encodings: every element lies inside its group's range, so within half a step
    assert ((w - q(w)).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(grouped_cases())
def test_fake_quant_is_idempotent_and_quantize_dequantize_matches(case):
    scheme, shape, seed = case
    w = _weight(shape, seed)
    q = _calibrated(scheme, w)
    y = q(w)
    torch.testing.assert_close(q(y), y, rtol=0, atol=0)
    torch.testing.assert_close(q.quantize(w).dequantize(), y, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(grouped_cases())
def test_agrees_with_a_float64_reference(case):
    scheme, shape, seed = case
    w = _weight(shape, seed)
    q = _calibrated(scheme, w)
    expected, ref_scale = reference_fake_quant(w, scheme)
    torch.testing.assert_close(q.scale.double(), ref_scale, rtol=1e-6, atol=0)
    # float32 vs float64 rounding may move a value sitting on a rounding tie by one step
    step = q.quantize(w).broadcast_encoding()[0].double()
    diff = (q(w).double() - expected).abs()
    assert (diff <= step * 1.001).all()
    exact = diff <= 1e-5 * step + 1e-6 * expected.abs()  # float32 of the same value
    assert int((~exact).sum()) <= max(1, exact.numel() // 100)


def reference_lsq_grads(x, scale, zp, scheme, grad_out):
    """LSQ (Esser et al. 2020) step-size and zero-point gradients per group, in float64."""
    g = scheme.group_size
    rows, go = x.double().reshape(-1, g), grad_out.double().reshape(-1, g)
    s, z = scale.double().reshape(-1, 1), zp.double().round().reshape(-1, 1)
    v = torch.round(rows / s) + z
    below, above = v < scheme.qmin, v > scheme.qmax
    inside = ~(below | above)
    ds = torch.where(inside, torch.round(rows / s) - rows / s, 0.0)
    ds = ds + below * (scheme.qmin - z) + above * (scheme.qmax - z)
    factor = 1.0 / (g * scheme.qmax) ** 0.5
    grad_s = (ds * go).sum(1) * factor
    grad_z = ((below | above) * -s * go).sum(1) * factor
    grad_x = inside * go
    return grad_x.reshape(x.shape), grad_s.reshape(scale.shape), grad_z.reshape(scale.shape)


@settings(max_examples=40, deadline=None)
@given(grouped_cases(learnable=True), st.floats(0.3, 1.5))
def test_lsq_gradients_match_a_float64_reference(case, shrink):
    scheme, shape, seed = case
    w = _weight(shape, seed)
    q = _calibrated(scheme, w)
    assert isinstance(q.scale, torch.nn.Parameter) and q.scale.shape == group_shape(
        shape, scheme.group_size
    )
    with torch.no_grad():
        q.scale.mul_(shrink)  # some values clip, some do not
    x = w.clone().requires_grad_()
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    q(x).backward(grad_out)
    gx, gs, gz = reference_lsq_grads(w, q.scale.detach(), q.zero_point.detach(), scheme, grad_out)
    torch.testing.assert_close(x.grad.double(), gx, rtol=0, atol=0)
    torch.testing.assert_close(q.scale.grad.double(), gs, rtol=1e-4, atol=1e-5)
    if not scheme.symmetric:
        torch.testing.assert_close(q.zero_point.grad.double(), gz, rtol=1e-4, atol=1e-5)


def test_fake_quantize_is_the_per_channel_kernel_on_the_reshaped_weight() -> None:
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=4)
    w = torch.randn(3, 8)
    q = _calibrated(scheme, w)
    rows = torch.fake_quantize_per_channel_affine(
        w.reshape(-1, 4), q.scale.reshape(-1), q.zero_point.reshape(-1), 0, -8, 7
    )
    torch.testing.assert_close(fake_quantize(w, q.scale, q.zero_point, scheme), rows.reshape(3, 8))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"granularity": "per_group"}, r"group_size=None .*integer >= 1"),
        ({"granularity": "per_group", "group_size": 0}, r"group_size=0"),
        ({"granularity": "per_group", "group_size": 2.0}, r"group_size=2.0"),
        ({"granularity": "per_group", "group_size": True}, r"group_size=True"),
        ({"granularity": "per_channel", "group_size": 32}, r"group_size=32 .*per_group"),
        ({"granularity": "per_group", "group_size": 8, "observer": "entropy"}, r"observer"),
    ],
)
def test_scheme_validates_group_size(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        QuantScheme(**fields)


def test_group_size_need_not_be_a_power_of_two() -> None:
    q = _calibrated(QuantScheme(bits=4, granularity="per_group", group_size=3), torch.randn(2, 9))
    assert q.scale.shape == (2, 3)


def test_a_group_size_that_does_not_divide_is_refused() -> None:
    with pytest.raises(GroupSizeError, match=r"last dimension \(10.*group_size=4.*divides 10"):
        Quantizer(QuantScheme(granularity="per_group", group_size=4, learnable=True), shape=(3, 10))
    q = Quantizer(QuantScheme(granularity="per_group", group_size=4))
    with pytest.raises(ChannelCountError, match="group_size=4"):
        q(torch.randn(3, 10))
    q(torch.randn(3, 8))
    with pytest.raises(ChannelCountError, match="one shape"):
        q(torch.randn(3, 12))


@pytest.mark.parametrize("observer", ["minmax", "moving_minmax", "percentile", "mse"])
def test_observers_give_one_range_per_group(observer) -> None:
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=4, observer=observer)
    w = torch.randn(2, 8)
    w[1, 4:] *= 100  # one loud group
    q = _calibrated(scheme, w)
    assert q.scale.shape == (2, 2)
    assert float(q.scale[1, 1]) > 20 * float(q.scale[1, 0])
    assert ((q(w) - w).abs() <= q.quantize(w).broadcast_encoding()[0] * 2).all()


def test_state_dict_resumes_exactly() -> None:
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=8, learnable=True)
    w = torch.randn(4, 16)
    q = _calibrated(scheme, w)
    with torch.no_grad():
        q.scale.mul_(1.3)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = Quantizer(scheme, shape=(4, 16))
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(w), q(w), rtol=0, atol=0)
    static = _calibrated(scheme.replace(learnable=False), w)
    lazy = Quantizer(scheme.replace(learnable=False))  # sized by the checkpoint
    lazy.load_state_dict(static.state_dict())
    torch.testing.assert_close(lazy(w), static(w), rtol=0, atol=0)


def test_qtensor_carries_group_size() -> None:
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=4)
    w = torch.randn(2, 8)
    qt = _calibrated(scheme, w).quantize(w)
    assert qt.group_size == 4 and qt.codes.dtype == torch.int8 and qt.scale.shape == (2, 2)
    with pytest.raises(ValueError, match=r"groups of 4 need a scale of shape \(2, 2\)"):
        QTensor(qt.codes, qt.scale[:, :1], qt.zero_point[:, :1], scheme)
