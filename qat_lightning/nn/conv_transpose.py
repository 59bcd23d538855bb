"""Quantized ConvTranspose1d/2d/3d: transposed convolutions (decoders, upsampling heads).

A transposed convolution's weight is laid out ``(in_channels, out_channels // groups, *k)``,
so the per-channel weight axis is 1. With ``groups > 1``, slice ``j`` of that axis feeds output
channel ``g * (out_channels // groups) + j`` of every group ``g``: one weight scale serves
``groups`` output channels, and the integer accumulator's per-output-channel scale is the weight
scale repeated ``groups`` times (the same layout ONNX ``DequantizeLinear(axis=1)`` implies).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.linear import QuantMAC
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor


class _QuantConvTransposeNd(QuantMAC):
    _quantized_params: ClassVar[dict[str, int]] = {"weight": 1}
    mac_weight_input_axis: ClassVar[int] = 0  # weight (in, out // groups, *k)
    # float64: no proof that every deconvolution kernel sums integer products exactly in float32
    mac_float32_exact: ClassVar[bool] = False

    @staticmethod
    def mac_op(layer: nn.Module, x, w, b, *extra: Any) -> torch.Tensor:
        """The float op, with ``output_padding`` (or ``output_size``) honoured as torch does."""
        output_size = extra[0] if extra else None
        dims = len(layer.kernel_size)
        output_padding = layer._output_padding(
            x, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation
        )
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(
            x, w, b, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation
        )

    @staticmethod
    def accumulator_channel_scale(layer: nn.Module, w_scale: torch.Tensor) -> torch.Tensor:
        if w_scale.dim() > 0 and layer.groups > 1:
            return w_scale.repeat(layer.groups)  # weight[:, j] serves channel j of each group
        return w_scale

    @integer_in_eval
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self.mac_forward(x, *([] if output_size is None else [output_size]))

    def quantized_forward(self, q: QTensor, output_size: list[int] | None = None) -> QTensor:
        return super().quantized_forward(q, *([] if output_size is None else [output_size]))


@register_quant_module(nn.ConvTranspose1d)
class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` with fake-quantized input, weight (per-channel axis 1) and output."""


@register_quant_module(nn.ConvTranspose2d)
class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` with fake-quantized input, weight (per-channel axis 1) and output."""


@register_quant_module(nn.ConvTranspose3d)
class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """`nn.ConvTranspose3d` with fake-quantized input, weight (per-channel axis 1) and output."""
