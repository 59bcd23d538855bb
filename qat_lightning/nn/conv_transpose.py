"""Quantized ConvTranspose1d/2d/3d: transposed convolutions (decoders, upsampling heads).

A transposed convolution's weight is laid out ``(in_channels, out_channels // groups, *k)``,
so the per-channel weight axis is 1. With ``groups > 1``, slice ``j`` of that axis feeds output
channel ``g * (out_channels // groups) + j`` of every group ``g``: one weight scale serves
``groups`` output channels, and the integer accumulator's per-output-channel scale is the weight
scale repeated ``groups`` times (the same layout ONNX ``DequantizeLinear(axis=1)`` implies).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import (
    QuantModule,
    accumulate_to_qtensor,
    integer_in_eval,
    register_quant_module,
)
from qat_lightning.nn.linear import quantize_bias, weight_qtensor
from qat_lightning.quant import QTensor


class _QuantConvTransposeNd(QuantModule):
    _quantized_params: ClassVar[dict[str, int]] = {"weight": 1}
    _spatial_dims: ClassVar[int]

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias that integer mode and export quantize."""
        return self.weight, self.bias

    def _transpose(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        output_size: list[int] | None,
    ) -> torch.Tensor:
        """The float op, with ``output_padding`` (or ``output_size``) honoured as torch does."""
        output_padding = self._output_padding(
            x,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            self._spatial_dims,
            self.dilation,
        )
        return self._conv_fn(
            x, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    @integer_in_eval
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = self.fq_input(x)
        return self.fq_output(self._transpose(x, self.fq_param("weight"), self.bias, output_size))

    def quantized_forward(self, q: QTensor, output_size: list[int] | None = None) -> QTensor:
        """Integer simulation: float64 transposed conv on centered codes (exact), int32 bias at
        ``s_in * s_w``, requantized to the output encoding."""
        q = self.input_qtensor(q)
        weight, bias = self.weight_and_bias()
        q_w = weight_qtensor(self, weight)
        if q.scale.dim() > 0:
            raise ValueError(f"{type(self).__name__}: integer mode needs a per-tensor input scale")
        w_scale = q_w.scale.double()
        if w_scale.dim() > 0 and self.groups > 1:
            w_scale = w_scale.repeat(self.groups)  # weight[:, j] serves channel j of each group
        acc_scale = q.scale.double() * w_scale
        x = q.centered(torch.int64).double()
        w = q_w.centered(torch.int64).double()
        acc = self._transpose(x, w, quantize_bias(bias, acc_scale), output_size)
        return accumulate_to_qtensor(acc, acc_scale, self.output_quantizers[0], axis=1)


@register_quant_module(nn.ConvTranspose1d)
class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` with fake-quantized input, weight (per-channel axis 1) and output."""

    _conv_fn = staticmethod(F.conv_transpose1d)
    _spatial_dims = 1


@register_quant_module(nn.ConvTranspose2d)
class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` with fake-quantized input, weight (per-channel axis 1) and output."""

    _conv_fn = staticmethod(F.conv_transpose2d)
    _spatial_dims = 2


@register_quant_module(nn.ConvTranspose3d)
class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """`nn.ConvTranspose3d` with fake-quantized input, weight (per-channel axis 1) and output."""

    _conv_fn = staticmethod(F.conv_transpose3d)
    _spatial_dims = 3
