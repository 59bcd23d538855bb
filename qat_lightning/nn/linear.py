"""Quantized Linear and Conv1d/2d/3d: the layers where the multiply-accumulates are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import (
    QuantModule,
    accumulate_to_qtensor,
    integer_in_eval,
    register_quant_module,
)
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


def exact_dtype(q_in: QTensor, q_w: QTensor, bias_codes: torch.Tensor | None) -> torch.dtype:
    """float32 where every partial sum of ``sum((x - zx)(w - zw)) + bias`` provably stays below
    2**24 (then float32 sums the integer products exactly, in any order), else float64.

    The bound: the largest centered input code times the largest per-output-channel sum of
    ``|w - zw|``, plus the largest bias code. float64 is exact far beyond int32 anyway; float32
    is the fast path eval mode takes on ordinary 8-bit layers.
    """
    if q_in.codes.device.type != "cpu":
        return torch.float64  # GPU kernels may use TF32 or transform-based algorithms
    scheme = q_in.scheme
    zx = q_in.zero_point.double().abs().max() if q_in.zero_point.numel() else 0.0
    x_max = max(abs(scheme.qmin), abs(scheme.qmax)) + float(zx) if scheme else 2.0**31
    w = q_w.centered(torch.int64).abs()
    w_sum = w.flatten(1).sum(1).max() if w.numel() else 0  # per output channel (axis 0)
    b_max = bias_codes.abs().max() if bias_codes is not None and bias_codes.numel() else 0
    return torch.float32 if x_max * float(w_sum) + float(b_max) < 2**24 else torch.float64


def integer_matmul_like(
    module: QuantModule,
    q_in: QTensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    op,
    channel_axis: int = 1,
) -> QTensor:
    """The integer pipeline of a MAC layer.

    ``op(x, w, b)`` is the float op (conv or linear) run on integer codes, in float32 where
    `exact_dtype` proves that exact and in float64 otherwise (products and sums of int8/int16
    codes stay far below 2**53). The accumulator holds ``sum((x - zx)(w - zw)) + bias_int32``
    at scale ``s_in * s_w``, and is requantized to the output encoding.
    """
    q_in = module.input_qtensor(q_in)
    q_w = weight_qtensor(module, weight)
    if q_in.scale.dim() > 0:
        raise ValueError(f"{type(module).__name__}: integer mode needs a per-tensor input scale")
    acc_scale = q_in.scale.double() * q_w.scale.double()  # 0-d, or per output channel
    bias_codes = quantize_bias(bias, acc_scale)
    dtype = exact_dtype(q_in, q_w, bias_codes)
    x = q_in.centered(torch.int32).to(dtype)
    w = q_w.centered(torch.int32).to(dtype)
    acc = op(x, w, None if bias_codes is None else bias_codes.to(dtype))
    return accumulate_to_qtensor(acc, acc_scale, module.output_quantizers[0], axis=channel_axis)


@register_quant_module(nn.Linear)
class QuantLinear(QuantModule, nn.Linear):
    """`nn.Linear` with fake-quantized input, weight and output."""

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
