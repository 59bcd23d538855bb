"""Dynamic activation schemes: the encoding is each tensor's own min/max, per tensor or per
token, computed at run time; nothing is observed or calibrated."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.surgery import QuantConfig

PER_TOKEN = QuantScheme(symmetric=False, signed=False, granularity="per_token", dynamic=True)


def reference_per_token(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, ...]:
    """Per-row min/max scale, zero point and fake quant in float64, from the definition."""
    rows = x.double().reshape(-1, x.shape[-1])
    mn, mx = rows.amin(1).clamp(max=0.0), rows.amax(1).clamp(min=0.0)
    eps = torch.finfo(torch.float32).eps
    if scheme.symmetric:
        scale = (torch.maximum(-mn, mx) / scheme.qmax).clamp(min=eps)
        zp = torch.zeros_like(scale)
    else:
        scale = ((mx - mn) / (scheme.qmax - scheme.qmin)).clamp(min=eps)
        zp = (scheme.qmin - torch.round(mn / scale.float().double())).clamp(
            scheme.qmin, scheme.qmax
        )
    s = scale.float().double()[:, None]
    codes = torch.clamp(torch.round(rows / s) + zp[:, None], scheme.qmin, scheme.qmax)
    return scale.reshape(x.shape[:-1]), zp.reshape(x.shape[:-1]), ((codes - zp[:, None]) * s)


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    dim=st.integers(1, 48),
    symmetric=st.booleans(),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_per_token_scales_are_each_rows_own(lead, dim, symmetric, bits, seed):
    scheme = QuantScheme(
        bits=bits, symmetric=symmetric, signed=symmetric, granularity="per_token", dynamic=True
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, dim, generator=g) * (torch.rand(*lead, 1, generator=g) * 10 + 0.01)
    q = Quantizer(scheme)
    scale, zp = q.encoding(x)
    ref_scale, ref_zp, ref_fq = reference_per_token(x, scheme)
    assert scale.shape == tuple(lead)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    assert (zp.double() - ref_zp).abs().max() <= 1  # a zero point on a rounding tie
    qt = q.quantize(x)
    assert int(qt.codes.min()) >= scheme.qmin and int(qt.codes.max()) <= scheme.qmax
    y = q(x)
    step = qt.broadcast_encoding()[0]
    assert ((y - x).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()  # nothing clips: its own range
    torch.testing.assert_close(qt.dequantize(), y, rtol=0, atol=0)
    if bool((zp.double() == ref_zp).all()):
        torch.testing.assert_close(y.double().reshape(-1, dim), ref_fq, rtol=1e-5, atol=1e-6)


def test_a_row_is_quantized_whatever_the_other_rows_hold() -> None:
    x = torch.tensor([[0.01, -0.02, 0.03], [100.0, -50.0, 25.0]])
    q = Quantizer(PER_TOKEN)
    small = q(x)[0]
    torch.testing.assert_close(small, q(x[:1])[0], rtol=0, atol=0)
    assert (small - x[0]).abs().max() < 1e-3  # a per-tensor scale (~0.6) would zero it


def test_per_tensor_dynamic_follows_each_batch() -> None:
    q = Quantizer(QuantScheme(dynamic=True))  # symmetric signed int8, per tensor
    for magnitude in (0.1, 10.0, 1000.0):
        x = torch.linspace(-magnitude, magnitude, 101)
        scale, _ = q.encoding(x)
        torch.testing.assert_close(scale, torch.tensor(magnitude / 127))
        assert (q(x) - x).abs().max() <= scale / 2 * 1.0001


def test_nothing_to_calibrate_and_nothing_observed() -> None:
    q = Quantizer(PER_TOKEN)
    assert q.is_initialized  # convert's check_calibrated accepts it untouched
    with q.compute_encodings():
        q(torch.randn(4, 8) * 100)
    assert not q.observer.has_data and not q.saw_only_zeros
    torch.testing.assert_close(q.scale, torch.ones(()))  # the placeholder: never moved
    assert "dynamic" in q.extra_repr() and "observer=none" in q.extra_repr()


def test_non_finite_values_are_left_out_of_the_range() -> None:
    x = torch.tensor([[1.0, float("nan"), -2.0, float("inf")], [0.5, 0.25, 0.0, -0.5]])
    scale, _ = Quantizer(PER_TOKEN).encoding(x)
    assert torch.isfinite(scale).all()
    torch.testing.assert_close(scale[0], torch.tensor(3.0 / 255))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"granularity": "per_token"}, r"granularity='per_token'.*dynamic=True"),
        ({"dynamic": True, "granularity": "per_channel"}, r"granularity='per_channel'"),
        ({"dynamic": True, "learnable": True}, r"learnable=True"),
        ({"dynamic": True, "observer": "mse"}, r"observer='mse'"),
        ({"dynamic": 1}, r"dynamic=1"),
    ],
)
def test_scheme_validates_dynamic(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        QuantScheme(**fields)


def test_dynamic_is_for_activations_and_per_group_for_weights() -> None:
    with pytest.raises(ValueError, match=r"params.*dynamic=True is for activations"):
        QuantConfig(params={"dynamic": True})
    with pytest.raises(ValueError, match=r"inputs.*per_group.*is for weights"):
        QuantConfig(inputs={"granularity": "per_group", "group_size": 8})
    # over the moving-min/max activation default, dynamic=True needs no observer field
    config = QuantConfig(inputs={"dynamic": True, "granularity": "per_token"})
    assert config.inputs.dynamic and config.inputs.observer == "minmax"
