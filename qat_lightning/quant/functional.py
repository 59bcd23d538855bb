"""The pure math of quantization: encodings from ranges, fake quant, and STE quant/dequant.

Fake quantization is the hot path of every training step, so `fake_quantize` calls PyTorch's
fused ATen kernels (one pass over the tensor, gradient mask computed in the same pass). The
separate `quantize_ste` / `dequantize_ste` autograd functions express the same math in two
halves (float -> codes -> float) for the integer simulation and for code that needs the codes.
"""

from __future__ import annotations

import math

import torch

from qat_lightning.quant import cpu_fake_quant, host_float32
from qat_lightning.quant.scheme import QuantScheme

# The smallest scale an encoding may have: an all-zero tensor must not give a NaN scale.
EPS = host_float32.EPS


def code_dtype(scheme: QuantScheme) -> torch.dtype:
    """The smallest integer dtype that holds every code of ``scheme``."""
    if scheme.bits <= 8:
        return torch.int8 if scheme.signed else torch.uint8
    return torch.int16 if scheme.signed else torch.int32


def channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def expand_encoding(t: torch.Tensor, ndim: int, scheme: QuantScheme | None) -> torch.Tensor:
    """A scale or zero point of ``scheme`` shaped to broadcast against an ``ndim``-d tensor:
    per channel along ``axis``; per group repeated ``group_size`` times along the last axis;
    per token with a trailing axis of 1; a 0-d one as it is."""
    if t.dim() == 0 or scheme is None:
        return t
    if scheme.per_group:
        return t.repeat_interleave(scheme.group_size, dim=-1)
    if scheme.granularity == "per_token":
        return t.unsqueeze(-1)
    return channel_view(t, ndim, scheme.axis % ndim)


def encodings_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for an observed range.

    Symmetric schemes use the amax form of pytorch-quantization, ``scale = amax / qmax``;
    affine schemes stretch ``[min(min, 0), max(max, 0)]`` over ``[qmin, qmax]`` so that 0 is
    exactly representable. Fixed point ignores the range: ``scale = 2**-frac_bits``.
    """
    min_val = min_val.detach().float()
    max_val = max_val.detach().float()
    if scheme.representation == "fixed_point":
        scale = torch.full_like(min_val, 2.0**-scheme.frac_bits)
        return scale, torch.zeros_like(min_val, dtype=torch.int32)
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    if scheme.symmetric:
        amax = max_val if not scheme.signed else torch.maximum(-min_val, max_val)
        scale = torch.clamp(amax / scheme.qmax, min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((max_val - min_val) / (scheme.qmax - scheme.qmin), min=EPS)
    zero_point = torch.clamp(scheme.qmin - torch.round(min_val / scale), scheme.qmin, scheme.qmax)
    return scale, zero_point.to(torch.int32)


def lsq_grad_factor(x: torch.Tensor, scheme: QuantScheme) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * qmax)``, N = elements per scale."""
    n = x.numel()
    if scheme.per_group:
        n = scheme.group_size
    elif scheme.granularity == "per_token":
        n = x.shape[-1] if x.dim() else 1
    elif scheme.per_channel:
        n //= max(x.shape[scheme.axis % x.dim()], 1)
    return 1.0 / math.sqrt(max(n, 1) * max(scheme.qmax, 1))


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QuantScheme,
    batch_range: tuple[float, float] | None = None,
    encoding: tuple[float, int] | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one fused kernel, with a straight-through gradient.

    The gradient w.r.t. ``x`` is passed through where the code was in ``[qmin, qmax]`` and is
    zero where the input was clipped. For a learnable scheme, ``scale`` (and an affine
    ``zero_point``) receive LSQ gradients.

    Per group (and per token) this is the per-channel kernel over ``x`` reshaped to rows of
    the last axis, ``(numel // group_size, group_size)``, one scale per row. Per tensor on
    the CPU it runs `cpu_fake_quant`'s vectorized kernels (the same values and gradient);
    ``batch_range``, the finite ``(min, max)`` of ``x`` where the caller knows it (floats per
    tensor, per-channel tensors per channel), lets that path skip the clipping work when
    nothing is outside the range (per channel it is the only case it takes). ``encoding``:
    ``scale`` and ``zero_point`` (per tensor) as Python values, where the caller has them,
    so that path reads neither tensor.
    """
    if scheme.per_group or scheme.granularity == "per_token":
        width = scheme.group_size if scheme.per_group else x.shape[-1]
        rows, axis = x.reshape(-1, width), 0
    else:
        rows, axis = x, (scheme.axis % x.dim() if scheme.per_channel and x.dim() else 0)
    y = _fake_quantize(
        rows, scale, zero_point, scheme, axis, lsq_grad_factor(x, scheme), batch_range, encoding
    )
    return y.reshape(x.shape)


def _fake_quantize(
    x,
    scale,
    zero_point,
    scheme: QuantScheme,
    axis: int,
    grad_factor: float,
    batch_range=None,
    encoding=None,
):
    qmin, qmax = scheme.qmin, scheme.qmax
    per_channel = scheme.multi_scale and scale.dim() > 0
    # The fused kernels take a float32 scale whatever x's dtype (a module moved to float64).
    scale = scale.float()
    if scheme.learnable:
        zp = zero_point.float()
        xf = x.float()  # the LSQ kernels' backward wants float32 throughout
        if per_channel:
            y = torch._fake_quantize_learnable_per_channel_affine(
                xf, scale.reshape(-1), zp.reshape(-1), axis, qmin, qmax, grad_factor
            )
        else:
            y = torch._fake_quantize_learnable_per_tensor_affine(
                xf, scale.reshape(1), zp.reshape(1), qmin, qmax, grad_factor
            )
        return y.to(x.dtype)
    if zero_point.dtype != torch.int32:
        zero_point = zero_point.round().to(torch.int32)
    if per_channel:
        if scheme.per_channel and batch_range is not None:
            fast = cpu_fake_quant.fake_quantize_per_channel(
                x, scale.reshape(-1), zero_point.reshape(-1), axis, qmin, qmax, batch_range
            )
            if fast is not None:
                return fast
        return torch.fake_quantize_per_channel_affine(
            x, scale.reshape(-1), zero_point.reshape(-1), axis, qmin, qmax
        )
    fast = cpu_fake_quant.fake_quantize_per_tensor(
        x, scale, zero_point, qmin, qmax, batch_range, encoding
    )
    if fast is not None:
        return fast
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


class _QuantizeSTE(torch.autograd.Function):
    """float -> integer-valued codes; gradient ``1/scale`` inside the range, 0 where clipped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        inv_scale = 1.0 / scale
        unclamped = torch.round(x * inv_scale) + zero_point
        mask = (unclamped >= qmin) & (unclamped <= qmax)
        ctx.save_for_backward(mask, inv_scale)
        return torch.clamp(unclamped, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        mask, inv_scale = ctx.saved_tensors
        return grad * mask * inv_scale, None, None, None, None


class _DequantizeSTE(torch.autograd.Function):
    """codes -> float; gradient ``scale``."""

    @staticmethod
    def forward(ctx, q, scale, zero_point):
        ctx.save_for_backward(scale)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


def _broadcast(scale, zero_point, x: torch.Tensor, scheme: QuantScheme):
    scale = scale.detach().float()
    zero_point = zero_point.detach().float().round()
    if scheme.multi_scale and scale.dim() > 0 and x.dim() > 0:
        return expand_encoding(scale, x.dim(), scheme), expand_encoding(zero_point, x.dim(), scheme)
    return scale, zero_point


def quantize_ste(x: torch.Tensor, scale, zero_point, scheme: QuantScheme) -> torch.Tensor:
    """Codes of ``x`` as a float tensor of integers in ``[qmin, qmax]``, differentiable (STE).

    Rounds exactly as the fused kernels do: ``round(x * (1/scale)) + zero_point`` in float32,
    ties to even.
    """
    s, z = _broadcast(scale, zero_point, x, scheme)
    return _QuantizeSTE.apply(x, s, z, scheme.qmin, scheme.qmax)


def dequantize_ste(q: torch.Tensor, scale, zero_point, scheme: QuantScheme) -> torch.Tensor:
    """Float values of codes ``q``: ``(q - zero_point) * scale``, differentiable."""
    s, z = _broadcast(scale, zero_point, q, scheme)
    return _DequantizeSTE.apply(q, s, z)
