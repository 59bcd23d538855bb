"""The multiply-accumulate families: `QuantMAC`, and quantized Linear and Conv1d/2d/3d.

A MAC family says what its multiply-accumulate is (``mac_op``, ``mac_output_axis``, ...: the
layer protocol on `QuantModule`); `QuantMAC` gives it the fake-quant ``forward``, the integer
``quantized_forward`` (`integer_mac`, the one integer MAC) and its `convert` form. A user's own
MAC layer is one class:

Example:
    >>> @register_quant_module(ScaledLinear)
    ... class QuantScaledLinear(QuantMAC, ScaledLinear):
    ...     mac_output_axis = -1
    ...     def weight_and_bias(self):
    ...         return self.weight * self.gain[:, None], self.bias
    ...     @staticmethod
    ...     def mac_op(layer, x, w, b):
    ...         return F.linear(x, w, b)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import QuantModule, integer_in_eval
from qat_lightning.nn.grouped import grouped_quantized_forward, uses_grouped_path
from qat_lightning.nn.integer import (
    accumulator_scale,
    integer_mac,
    quantize_bias,
    weight_qtensor,
)
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor


class QuantMAC(QuantModule):
    """Base of the multiply-accumulate families: a float weight (BN-folded in the fused
    families), an optional bias, and an op linear in the input.

    A family sets ``mac_op`` (and ``mac_output_axis``, ``_quantized_params`` for the weight's
    channel axis, ``mac_weight_input_axis``, ``mac_float32_exact``, ``accumulator_channel_scale``
    where they differ from the defaults) and, if the weight the layer computes with is not its
    ``weight`` parameter as it is, ``weight_and_bias``.
    """

    convert_as: ClassVar[str] = "mac"

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight and bias that fake quant, integer mode and export quantize."""
        return self.weight, getattr(self, "bias", None)

    def mac_forward(self, x: torch.Tensor, *extra: Any) -> torch.Tensor:
        """Fake quant: the op on the fake-quantized input, weight and (int32-rounded) bias."""
        weight, bias = self.weight_and_bias()
        x = self.fq_input(x)
        y = self.mac_op(self, x, self.fq_param("weight", weight), self.fq_bias(bias), *extra)
        return self.fq_output(F.relu(y) if self.output_relu else y)

    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mac_forward(x)

    def quantized_forward(self, q: QTensor, *extra: Any) -> QTensor:
        """Integer simulation: `integer_mac` on the input codes (re-quantized to this layer's
        own input encoding, if it has one) and the weight codes, int32 bias at
        ``s_in * s_w``, requantized to the output encoding."""
        q = self.input_qtensor(q)
        weight, bias = self.weight_and_bias()
        q_w = weight_qtensor(self, weight)
        bias_codes = quantize_bias(bias, accumulator_scale(type(self), self, q.scale, q_w.scale))
        output = self.output_quantizers[0]
        return integer_mac(type(self), self, q, q_w, bias_codes, output, extra, self.output_relu)


@register_quant_module(nn.Linear)
class QuantLinear(QuantMAC, nn.Linear):
    """`nn.Linear` with fake-quantized input, weight and output (the weight per tensor,
    channel or group; the input static or dynamic)."""

    _takes_dynamic_inputs = True

    mac_output_axis: ClassVar[int] = -1
    mac_float32_exact: ClassVar[bool] = True

    @staticmethod
    def mac_op(layer: nn.Module, x, w, b, *extra: Any) -> torch.Tensor:
        return F.linear(x, w, b)

    def quantized_forward(self, q: QTensor, *extra: Any) -> QTensor:
        if uses_grouped_path(self):  # per-group weight or dynamic input (`nn.grouped`)
            weight, bias = self.weight_and_bias()
            return grouped_quantized_forward(self, q, weight, bias)
        return super().quantized_forward(q, *extra)


class _QuantConvNd(QuantMAC):
    mac_float32_exact: ClassVar[bool] = True

    @staticmethod
    def mac_op(layer: nn.Module, x, w, b, *extra: Any) -> torch.Tensor:
        # Zero padding of centered codes is the real zero: the affine zero point is exact;
        # other padding modes pad with input values (codes minus the zero point), also exact.
        return layer._conv_forward(x, w, b)


@register_quant_module(nn.Conv1d)
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """`nn.Conv1d` with fake-quantized input, weight and output."""


@register_quant_module(nn.Conv2d)
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """`nn.Conv2d` with fake-quantized input, weight and output."""


@register_quant_module(nn.Conv3d)
class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """`nn.Conv3d` with fake-quantized input, weight and output."""
