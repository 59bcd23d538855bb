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

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.eval_cache import clear_eval_cache, eval_cache, module_state_key
from qat_lightning.nn.grouped import grouped_quantized_forward, uses_grouped_path
from qat_lightning.nn.integer import (
    MacWeights,
    accumulator_scale,
    integer_mac,
    mac_weights,
    quantize_bias,
    weight_qtensor,
)
from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor


class QuantMAC(QuantModule):
    """Base of the multiply-accumulate families: a float weight (BN-folded in the fused
    families), an optional bias, and an op linear in the input.

    A family sets ``mac_op`` (and ``mac_output_axis``, ``_quantized_params`` for the weight's
    channel axis, ``mac_weight_input_axis``, ``mac_float32_exact``, ``accumulator_channel_scale``
    where they differ from the defaults) and, if the weight the layer computes with is not its
    ``weight`` parameter as it is, ``weight_and_bias``.

    Integer mode keeps the weight codes, the int32 bias and the exact input ranges
    (`MacWeights`) in an `EvalCache` keyed by every parameter and buffer of the module and the
    input encoding: ``weight_and_bias`` must read only those (and hyperparameters), or the
    family sets ``caches_mac_weights = False``.
    """

    convert_as: ClassVar[str] = "mac"
    caches_mac_weights: ClassVar[bool] = True
    """Integer mode may reuse `MacWeights` until a parameter, buffer or encoding changes."""

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
        weights = self.mac_weights(q)
        output = self.output_quantizers[0]
        return integer_mac(
            type(self), self, q, weights.q_w, weights.bias, output, extra, self.output_relu, weights
        )

    def mac_weights(self, q: QTensor) -> MacWeights:
        """`MacWeights` of the current weight and bias for inputs with ``q``'s encoding: the
        cached one unless a parameter, buffer, scheme or that encoding changed."""

        def compute() -> MacWeights:
            weight, bias = self.weight_and_bias()
            q_w = weight_qtensor(self, weight)
            acc_scale = accumulator_scale(type(self), self, q.scale, q_w.scale)
            return mac_weights(type(self), self, q, q_w, quantize_bias(bias, acc_scale))

        if not self.caches_mac_weights or q.scale.dim() > 0 or q.zero_point.dim() > 0:
            return compute()  # (a per-channel input scale raises there)
        schemes = tuple(quantizer.scheme for quantizer in self.quantizers())
        key = (
            *module_state_key(self),
            schemes,
            q.scheme,
            q.codes.device,
            float(q.scale),
            float(q.zero_point),
        )
        return eval_cache(self).get(key, compute)

    def train(self, mode: bool = True) -> QuantMAC:
        # Training changes the weights: free the memory now. Entering eval starts afresh too,
        # so a weight written through ``.data`` (which bumps no version counter) between two
        # validation runs is never served from a stale cache.
        clear_eval_cache(self)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        clear_eval_cache(self)
        return super()._apply(fn, recurse)


@register_quant_module(nn.Linear)
class QuantLinear(QuantMAC, nn.Linear):
    """`nn.Linear` with fake-quantized input, weight and output (the weight per tensor,
    channel or group; the input static or dynamic)."""

    _takes_dynamic_inputs = True

    mac_output_axis: ClassVar[int] = -1
    mac_float32_exact: ClassVar[bool] = True

    @staticmethod
    def mac_op(layer: nn.Module, x, w, b, *extra: Any) -> torch.Tensor:
        if b is not None and x.dim() > 2 and torch.onnx.is_in_onnx_export():
            return gemm_2d(x, w, b)
        return F.linear(x, w, b)

    def quantized_forward(self, q: QTensor, *extra: Any) -> QTensor:
        if uses_grouped_path(self):  # per-group weight or dynamic input (`nn.grouped`)
            weight, bias = self.weight_and_bias()
            return grouped_quantized_forward(self, q, weight, bias)
        return super().quantized_forward(q, *extra)


def gemm_2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w, b)`` for ``x`` of shape ``(..., in)`` through a 2-D ``Gemm`` with its
    bias: the ONNX form onnxruntime fuses into one integer ``QGemm`` (int32 bias added to the
    int32 accumulator, one requantization: the integer simulation's arithmetic). A 3-D
    ``MatMul`` + ``Add`` with a dynamic batch becomes ``MatMulIntegerToFloat`` and a float bias
    ``Add`` instead: slower, and one step off the integer model now and then."""
    return _on_rows(x, lambda rows: F.linear(rows, w, b))


def matmul_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + b`` for ``w`` of shape ``(in, out)`` (transformers' ``Conv1D``, attention
    projections); exported to ONNX as `gemm_2d` where there is a bias and ``x`` is 3-D+."""
    if b is not None and x.dim() > 2 and torch.onnx.is_in_onnx_export():
        return _on_rows(x, lambda rows: torch.matmul(rows, w) + b)
    y = torch.matmul(x, w)
    return y if b is None else y + b


def _on_rows(x: torch.Tensor, op) -> torch.Tensor:
    """``op`` on ``x`` flattened to 2-D rows ``(-1, in)``, reshaped back to ``(..., out)``."""
    y = op(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


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
