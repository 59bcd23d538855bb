"""Quantized Linear and Conv1d/2d/3d: the layers where the multiply-accumulates are."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import (
    QuantModule,
    accumulate_to_qtensor,
    integer_in_eval,
    register_quant_module,
)
from qat_lightning.nn.grouped import grouped_quantized_forward, uses_grouped_path
from qat_lightning.quant import QTensor, Quantizer


def quantize_bias(bias: torch.Tensor | None, acc_scale: torch.Tensor) -> torch.Tensor | None:
    """Bias as int32 codes at the accumulator scale ``s_in * s_w`` (as float64 integers)."""
    if bias is None:
        return None
    codes = torch.round(bias.detach().double() / acc_scale.double())
    return codes.clamp(-(2**31), 2**31 - 1)


def weight_qtensor(module: QuantModule, weight: torch.Tensor) -> QTensor:
    """Codes of a weight (``weight`` may be BN-folded) under the module's weight quantizer."""
    quantizer: Quantizer | None = module.param_quantizers["weight"]
    if quantizer is None:
        raise ValueError(
            f"{type(module).__name__}: integer mode needs a weight quantizer; this layer's "
            "weight is float"
        )
    return quantizer.quantize(weight.detach())


def exact_chunks(q_in: QTensor, q_w: QTensor, groups: int = 1) -> list[slice] | None:
    """Input-channel ranges whose products float32 sums exactly, or None (use float64).

    float32 adds integers exactly, in any order, while every partial sum stays below 2**24.
    A range is safe when the largest centered input code times the largest per-output-channel
    sum of ``|w - zw|`` over the range stays below that. Most 8-bit layers fit in one range;
    wide ones (a 3x3 conv over 512 channels) are split into a few, each run in float32 and
    summed in float64. Off the CPU (TF32, transform-based kernels) and for grouped layers
    that need splitting, the answer is float64.
    """
    scheme = q_in.scheme
    if q_in.codes.device.type != "cpu" or scheme is None:
        return None
    zx = float(q_in.zero_point.abs().max()) if q_in.zero_point.numel() else 0.0
    x_max = max(abs(scheme.qmin), abs(scheme.qmax)) + zx
    w = q_w.centered(torch.int64).abs()
    if w.numel() == 0:
        return [slice(None)]
    per_input = (w.flatten(2).sum(2) if w.dim() > 2 else w).double()  # (out, in)
    cumulative = torch.nn.functional.pad(per_input.cumsum(1), (1, 0))
    limit = 2**24 / x_max
    n_in = per_input.shape[1]
    pieces = max(1, math.ceil(float(cumulative[:, -1].max()) / limit))
    if pieces > 1 and groups > 1:
        return None
    while pieces <= n_in:
        bounds = [round(j * n_in / pieces) for j in range(pieces + 1)]
        sums = cumulative[:, bounds[1:]] - cumulative[:, bounds[:-1]]
        if float(sums.max()) < limit:
            return [slice(a, b) for a, b in itertools.pairwise(bounds)]
        pieces += 1
    return None  # one input channel alone is too wide


def exact_accumulate(
    op, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, chunks, axis: int
) -> torch.Tensor:
    """``op(x, w) + bias`` on centered integer codes, exactly: in float32 per range of
    `exact_chunks` (float64 sum of the ranges, then the bias), or all in float64 (``chunks``
    None). A float32 result is exact integers below 2**24."""
    if chunks is None:
        return op(x.double(), w.double(), None if bias is None else bias.double())
    x, w = x.float(), w.float()
    if len(chunks) == 1:
        acc = op(x, w, None)
        exact = bias is None or float(acc.abs().max()) + float(bias.abs().max()) < 2**24
        view = [1] * acc.dim()
        view[axis] = -1
        if exact:
            return acc if bias is None else acc + bias.float().reshape(view)
        return acc.double() + bias.double().reshape(view)
    acc = sum(op(x.narrow(axis, c.start, c.stop - c.start), w[:, c], None).double() for c in chunks)
    if bias is not None:
        view = [1] * acc.dim()
        view[axis] = -1
        acc = acc + bias.double().reshape(view)
    return acc


def integer_matmul_like(
    module: QuantModule,
    q_in: QTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    op,
    channel_axis: int = 1,
    post=None,
) -> QTensor:
    """The integer pipeline of a MAC layer.

    ``op(x, w, b)`` is the float op (conv or linear, linear in ``x``) run on integer codes
    exactly (`exact_chunks`); ``post`` an elementwise function of the accumulator (a fused
    ReLU). The accumulator holds ``sum((x - zx)(w - zw)) + bias_int32`` at scale
    ``s_in * s_w``, and is requantized to the output encoding.
    """
    q_in = module.input_qtensor(q_in)
    q_w = weight_qtensor(module, weight)
    if q_in.scale.dim() > 0:
        raise ValueError(f"{type(module).__name__}: integer mode needs a per-tensor input scale")
    acc_scale = q_in.scale.double() * q_w.scale.double()  # 0-d, or per output channel
    bias_codes = quantize_bias(bias, acc_scale)
    chunks = exact_chunks(q_in, q_w, getattr(module, "groups", 1))
    if chunks is None:
        x, w = q_in.centered(torch.int64), q_w.centered(torch.int64)
    else:  # codes and zero points of at most 16 bits: float32 holds them and their difference
        x, w = q_in.centered_float(), q_w.centered_float()
    acc = exact_accumulate(op, x, w, bias_codes, chunks, channel_axis)
    if post is not None:
        acc = post(acc)
    return accumulate_to_qtensor(acc, acc_scale, module.output_quantizers[0], axis=channel_axis)


@register_quant_module(nn.Linear)
class QuantLinear(QuantModule, nn.Linear):
    """`nn.Linear` with fake-quantized input, weight and output (the weight per tensor,
    channel or group; the input static or dynamic)."""

    _takes_dynamic_inputs = True

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias that integer mode and export quantize (BN-folded in the
        fused subclasses)."""
        return self.weight, self.bias

    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fq_input(x)
        return self.fq_output(F.linear(x, self.fq_param("weight"), self.fq_bias(self.bias)))

    def quantized_forward(self, q: QTensor) -> QTensor:
        weight, bias = self.weight_and_bias()
        if uses_grouped_path(self):  # per-group weight or dynamic input
            return grouped_quantized_forward(self, q, weight, bias)
        return integer_matmul_like(self, q, weight, bias, F.linear, channel_axis=-1)


class _QuantConvNd(QuantModule):
    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias that integer mode and export quantize (BN-folded in the
        fused subclasses)."""
        return self.weight, self.bias

    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fq_input(x)
        weight, bias = self.fq_param("weight"), self.fq_bias(self.bias)
        return self.fq_output(self._conv_forward(x, weight, bias))

    def quantized_forward(self, q: QTensor) -> QTensor:
        weight, bias = self.weight_and_bias()
        return integer_matmul_like(self, q, weight, bias, self._integer_conv)

    def _integer_conv(self, x, w, b):
        if self.padding_mode != "zeros":
            # Non-zero padding pads with input values, which are codes minus the zero point.
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv_fn(x, w, b, self.stride, 0, self.dilation, self.groups)
        # Zero padding of centered codes is the real zero: the affine zero point is exact.
        return self._conv_fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)


@register_quant_module(nn.Conv1d)
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    _conv_fn = staticmethod(F.conv1d)


@register_quant_module(nn.Conv2d)
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    _conv_fn = staticmethod(F.conv2d)


@register_quant_module(nn.Conv3d)
class QuantConv3d(_QuantConvNd, nn.Conv3d):
    _conv_fn = staticmethod(F.conv3d)
