"""Quantized elementwise activations: ``f`` on the input grid, requantized to the output grid.

An activation of a quantized input can only take one value per input code, so its integer form
is a lookup table over the input codes (what an integer runtime does for sigmoid or GELU):
``table[c] = quantize_out(f(dequantize_in(c)))``. `quantized_forward` builds that table and
indexes it, which is exactly ``forward`` in eval mode.

The quantized modules never compute in place, whatever ``inplace`` says: the input may be a
producer's (fake-quantized) output that another consumer, or autograd, still needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor


class _QuantActivation(QuantModule):
    """Fake-quantized input and output around a pure elementwise function ``_fn``."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract: each activation defines its function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq_output(self._fn(self.fq_input(x)))

    @torch.no_grad()
    def lookup_table(self, q_in: QTensor) -> torch.Tensor:
        """Output codes for every code ``qmin..qmax`` of ``q_in``'s (per-tensor) encoding.

        Example:
            >>> table = qrelu.lookup_table(q)      # table[c - qmin] is the output code of c
        """
        scheme = q_in.scheme
        codes = torch.arange(scheme.qmin, scheme.qmax + 1, device=q_in.codes.device)
        grid = QTensor(codes, q_in.scale, q_in.zero_point, scheme).dequantize()
        return self.output_quantizers[0].quantize(self._fn(grid)).codes

    def quantized_forward(self, q: QTensor) -> QTensor:
        """``f`` on the dequantized codes, quantized to the output encoding (a lookup table)."""
        q = self.input_qtensor(q)
        out = self.output_quantizers[0]
        if out is None:
            raise ValueError(
                f"{type(self).__name__}: integer mode needs an output quantizer (f maps codes "
                "off the input grid)"
            )
        if q.scheme is None or q.scale.dim() > 0:
            # An int32 accumulator or a per-channel input: no single table; compute directly.
            return out.quantize(self._fn(q.dequantize()))
        table = self.lookup_table(q)
        scale, zero_point = out.encoding()
        return QTensor(table[q.codes.long() - q.scheme.qmin], scale, zero_point, out.scheme)


@register_quant_module(nn.ReLU)
class QuantReLU(_QuantActivation, nn.ReLU):
    """`nn.ReLU` with fake-quantized input and output."""

    keeps_input_grid = True  # relu(x) is x or 0, both on x's grid

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def onnx_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU as ``LeakyRelu(alpha=0)``: ``DQ -> LeakyRelu -> Q`` fuses into onnxruntime's
        table-lookup ``QLinearLeakyRelu`` (the same table `quantized_forward` uses), where
        ``DQ -> Relu -> Q`` with a different output encoding stays two float passes."""
        x = self.fq_input(x)
        y = torch.onnx.ops.symbolic("LeakyRelu", [x], {"alpha": 0.0}, dtype=x.dtype, shape=x.shape)
        return self.fq_output(y)


@register_quant_module(nn.ReLU6)
class QuantReLU6(_QuantActivation, nn.ReLU6):
    """`nn.ReLU6` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, self.min_val, self.max_val)


@register_quant_module(nn.Hardtanh)
class QuantHardtanh(_QuantActivation, nn.Hardtanh):
    """`nn.Hardtanh` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, self.min_val, self.max_val)


@register_quant_module(nn.LeakyReLU)
class QuantLeakyReLU(_QuantActivation, nn.LeakyReLU):
    """`nn.LeakyReLU` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)


@register_quant_module(nn.Hardswish)
class QuantHardswish(_QuantActivation, nn.Hardswish):
    """`nn.Hardswish` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)


@register_quant_module(nn.Hardsigmoid)
class QuantHardsigmoid(_QuantActivation, nn.Hardsigmoid):
    """`nn.Hardsigmoid` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)


@register_quant_module(nn.Sigmoid)
class QuantSigmoid(_QuantActivation, nn.Sigmoid):
    """`nn.Sigmoid` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@register_quant_module(nn.Tanh)
class QuantTanh(_QuantActivation, nn.Tanh):
    """`nn.Tanh` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@register_quant_module(nn.GELU)
class QuantGELU(_QuantActivation, nn.GELU):
    """`nn.GELU` (exact or ``approximate="tanh"``) with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


@register_quant_module(nn.SiLU)
class QuantSiLU(_QuantActivation, nn.SiLU):
    """`nn.SiLU` with fake-quantized input and output."""

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)
