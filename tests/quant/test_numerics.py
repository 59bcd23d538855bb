"""Numerics of the quantization core over many schemes (hypothesis).

Codes stay in range, dequantize(quantize(x)) is within half a step, fake quant is idempotent,
the three views of a tensor (fake quant, codes, STE quant/dequant) agree bit for bit, and the
straight-through gradient is exactly the in-range mask.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import (
    Quantizer,
    QuantScheme,
    code_dtype,
    dequantize_ste,
    fake_quantize,
    quantize_ste,
)
from qat_lightning.quant.functional import channel_view

FAST = settings(max_examples=60, deadline=None)


@st.composite
def schemes(draw, fixed_point: bool = True, learnable: bool = False) -> QuantScheme:
    """Any valid scheme: 2..16 bits, signed/unsigned, narrow, per-tensor/channel, int/fixed."""
    bits = draw(st.integers(2, 16))
    representation = draw(st.sampled_from(["int", "fixed_point"])) if fixed_point else "int"
    signed = draw(st.booleans())
    fixed = representation == "fixed_point"
    return QuantScheme(
        bits=bits,
        signed=signed,
        narrow_range=draw(st.booleans()) if signed else False,
        symmetric=True if fixed else draw(st.booleans()),
        granularity=draw(st.sampled_from(["per_tensor", "per_channel"])),
        axis=draw(st.sampled_from([0, 1, -1])),
        representation=representation,
        frac_bits=draw(st.integers(0, bits)) if fixed else None,
        learnable=False if fixed else (learnable and draw(st.booleans())),
    )


shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 7))
seeds = st.integers(0, 2**31 - 1)
magnitudes = st.sampled_from([1e-3, 0.1, 1.0, 7.0, 300.0])


def _randn(shape, seed: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * magnitude


def calibrated(scheme: QuantScheme, shape, seed: int, magnitude: float) -> Quantizer:
    """A quantizer whose encodings were set from one random batch, observer then off."""
    channels = shape[scheme.axis] if scheme.per_channel else None
    q = Quantizer(scheme, num_channels=channels)
    with q.compute_encodings():
        q(_randn(shape, seed, magnitude))
    return q


def broadcast(q: Quantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer's scale and zero point (float) shaped to broadcast against ``x``."""
    scale, zero_point = q.encoding()
    zero_point = zero_point.float()
    if q.scheme.per_channel:
        axis = q.scheme.axis % x.dim()
        return channel_view(scale, x.dim(), axis), channel_view(zero_point, x.dim(), axis)
    return scale, zero_point


@FAST
@given(scheme=schemes(), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_codes_within_qmin_qmax(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    # Far outside the calibrated range on both sides, plus infinities.
    x = _randn(shape, seed + 1, magnitude * 10)
    x.view(-1)[0] = float("inf")
    x.view(-1)[-1] = float("-inf")
    qt = q.quantize(x)
    assert qt.codes.dtype == code_dtype(scheme)
    assert qt.codes.shape == x.shape
    assert int(qt.codes.min()) >= scheme.qmin
    assert int(qt.codes.max()) <= scheme.qmax
    scale, zero_point = q.encoding()
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert int(zero_point.min()) >= scheme.qmin and int(zero_point.max()) <= scheme.qmax


@FAST
@given(scheme=schemes(), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_dequantize_quantize_within_half_step(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    g = torch.Generator().manual_seed(seed + 2)
    u = torch.rand(shape, generator=g)
    scale, zero_point = broadcast(q, u)
    # Uniform over the representable range [(qmin - zp) * s, (qmax - zp) * s].
    x = (scheme.qmin - zero_point + u * (scheme.qmax - scheme.qmin)) * scale
    err = (q.quantize(x).dequantize() - x).abs()
    # Half a step, plus the float32 rounding of x * (1 / s) at up to 2**16 steps.
    tol = scale * (0.5 + 2.0**-22 * (scheme.qmax - scheme.qmin + 1))
    assert bool((err <= tol).all()), float((err - tol).max())


@FAST
@given(scheme=schemes(), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_fake_quant_is_idempotent(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    once = q(_randn(shape, seed + 3, magnitude * 2))
    assert torch.equal(q(once), once)


@FAST
@given(scheme=schemes(learnable=True), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_quantize_dequantize_equals_forward_bit_exactly(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    x = _randn(shape, seed + 4, magnitude * 2)
    fake = q(x)
    assert torch.equal(q.quantize(x).dequantize(), fake.detach())
    assert torch.equal(q.dequantize(q.quantize(x)), fake.detach())


@FAST
@given(scheme=schemes(), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_fake_quantize_equals_ste_quant_dequant(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    scale, zero_point = q.encoding()
    x = _randn(shape, seed + 5, magnitude * 2).requires_grad_()
    upstream = _randn(shape, seed + 6, 1.0)

    fused = fake_quantize(x, scale, zero_point, scheme)
    (grad_fused,) = torch.autograd.grad(fused, x, upstream)
    codes = quantize_ste(x, scale, zero_point, scheme)
    two_step = dequantize_ste(codes, scale, zero_point, scheme)
    (grad_two_step,) = torch.autograd.grad(two_step, x, upstream)

    assert torch.equal(fused, two_step)
    assert torch.equal(codes.detach(), q.quantize(x.detach()).codes.float())
    # The same straight-through mask: zero exactly where the input was clipped.
    assert torch.equal(grad_fused == 0, grad_two_step == 0)
    # The STE pair multiplies by s on the way back and by 1/s again: in float32 that product
    # is within one rounding of the fused kernel's exact pass-through, and exact when s is a
    # power of two (fixed point).
    if scheme.representation == "fixed_point":
        assert torch.equal(grad_fused, grad_two_step)
    else:
        torch.testing.assert_close(grad_two_step, grad_fused, rtol=2.4e-7, atol=0)


@FAST
@given(scheme=schemes(), shape=shapes, seed=seeds, magnitude=magnitudes)
def test_ste_gradient_is_the_in_range_mask(scheme, shape, seed, magnitude):
    q = calibrated(scheme, shape, seed, magnitude)
    x = _randn(shape, seed + 7, magnitude * 2).requires_grad_()
    q(x).sum().backward()
    scale, zero_point = broadcast(q, x)
    unclamped = torch.round(x.detach() * (1.0 / scale)) + zero_point
    mask = (unclamped >= scheme.qmin) & (unclamped <= scheme.qmax)
    assert torch.equal(x.grad, mask.float())


@FAST
@given(
    scheme=schemes(fixed_point=False),
    seed=seeds,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
)
def test_low_precision_input_keeps_its_dtype(scheme, seed, dtype):
    shape = (3, 4, 5)
    q = calibrated(scheme, shape, seed, 1.0)
    x = _randn(shape, seed + 8, 2.0).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    # The low-precision result is the float32 fake quant, rounded to the input's dtype.
    torch.testing.assert_close(y, q(x.float()).to(dtype), rtol=0, atol=0)
