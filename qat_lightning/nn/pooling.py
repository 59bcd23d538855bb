"""Quantized pooling: max pools keep the input's grid, average pools requantize.

A max over codes is the code of the max (scales are positive), so max pools have no output
quantizer: their output carries the input encoding on (``output_quantizers = [None]``). An
average is a new value between codes, so average pools own an output encoding. Both integer
simulations reuse the float op on codes, which keeps ``ceil_mode``, ``count_include_pad`` and
``divisor_override`` exactly as torch defines them: zero padding of *centered* codes is the real
zero, and max-pool padding is ``-inf`` whatever the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer import accumulate_to_qtensor
from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor, QuantScheme


class _QuantMaxPoolNd(QuantModule):
    """Max pools: fake-quantized input, output on the input's grid."""

    keeps_input_grid = True

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        super()._init_quantizers(inputs, params, outputs)
        self.output_quantizers = nn.ModuleList([None])  # the input encoding passes through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.fq_input(x))

    def quantized_forward(self, q: QTensor) -> QTensor:
        """Max over codes, in the input encoding (this module's own input one, if it has one)."""
        if self.return_indices:
            raise ValueError(
                f"{type(self).__name__}: return_indices=True has no integer simulation; "
                "allowed return_indices=False"
            )
        q = self.input_qtensor(q)
        # float64 holds every code (int32 accumulators included) exactly, on every device.
        codes = super().forward(q.codes.double()).to(q.codes.dtype)
        return QTensor(codes, q.scale, q.zero_point, q.scheme, q.axis)


class _QuantAvgPoolNd(QuantModule):
    """Average pools: fake-quantized input and output."""

    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq_output(super().forward(self.fq_input(x)))

    def quantized_forward(self, q: QTensor) -> QTensor:
        """Average of centered codes (float64) times the input scale, requantized."""
        q = self.input_qtensor(q)
        if self.output_quantizers[0] is None:
            raise ValueError(
                f"{type(self).__name__}: integer mode needs an output quantizer (an average is "
                "not on the input grid)"
            )
        acc = super().forward(q.centered(torch.int64).double())
        axis = q.axis if q.axis is not None else (q.scheme.axis if q.scheme else 1)
        return accumulate_to_qtensor(acc, q.scale, self.output_quantizers[0], axis=axis)

    def onnx_forward(self, x: torch.Tensor) -> torch.Tensor:
        """An adaptive average pool to size 1 as ``GlobalAveragePool`` (fuses into
        ``QLinearGlobalAveragePool``; the exporter's ``ReduceMean`` stays float)."""
        size = getattr(self, "output_size", None)  # (adaptive pools only)
        sizes = size if isinstance(size, (tuple, list)) else [size]
        if size is None or not all(s == 1 for s in sizes):
            return super().onnx_forward(x)
        x = self.fq_input(x)
        shape = [*x.shape[:2]] + [1] * (x.dim() - 2)
        y = torch.onnx.ops.symbolic("GlobalAveragePool", [x], dtype=x.dtype, shape=shape)
        return self.fq_output(y)


@register_quant_module(nn.MaxPool1d)
class QuantMaxPool1d(_QuantMaxPoolNd, nn.MaxPool1d):
    """`nn.MaxPool1d` on fake-quantized input."""


@register_quant_module(nn.MaxPool2d)
class QuantMaxPool2d(_QuantMaxPoolNd, nn.MaxPool2d):
    """`nn.MaxPool2d` on fake-quantized input."""


@register_quant_module(nn.MaxPool3d)
class QuantMaxPool3d(_QuantMaxPoolNd, nn.MaxPool3d):
    """`nn.MaxPool3d` on fake-quantized input."""


@register_quant_module(nn.AdaptiveMaxPool1d)
class QuantAdaptiveMaxPool1d(_QuantMaxPoolNd, nn.AdaptiveMaxPool1d):
    """`nn.AdaptiveMaxPool1d` on fake-quantized input."""


@register_quant_module(nn.AdaptiveMaxPool2d)
class QuantAdaptiveMaxPool2d(_QuantMaxPoolNd, nn.AdaptiveMaxPool2d):
    """`nn.AdaptiveMaxPool2d` on fake-quantized input."""


@register_quant_module(nn.AdaptiveMaxPool3d)
class QuantAdaptiveMaxPool3d(_QuantMaxPoolNd, nn.AdaptiveMaxPool3d):
    """`nn.AdaptiveMaxPool3d` on fake-quantized input."""


@register_quant_module(nn.AvgPool1d)
class QuantAvgPool1d(_QuantAvgPoolNd, nn.AvgPool1d):
    """`nn.AvgPool1d` with fake-quantized input and output."""


@register_quant_module(nn.AvgPool2d)
class QuantAvgPool2d(_QuantAvgPoolNd, nn.AvgPool2d):
    """`nn.AvgPool2d` with fake-quantized input and output."""


@register_quant_module(nn.AvgPool3d)
class QuantAvgPool3d(_QuantAvgPoolNd, nn.AvgPool3d):
    """`nn.AvgPool3d` with fake-quantized input and output."""


@register_quant_module(nn.AdaptiveAvgPool1d)
class QuantAdaptiveAvgPool1d(_QuantAvgPoolNd, nn.AdaptiveAvgPool1d):
    """`nn.AdaptiveAvgPool1d` with fake-quantized input and output."""


@register_quant_module(nn.AdaptiveAvgPool2d)
class QuantAdaptiveAvgPool2d(_QuantAvgPoolNd, nn.AdaptiveAvgPool2d):
    """`nn.AdaptiveAvgPool2d` with fake-quantized input and output."""


@register_quant_module(nn.AdaptiveAvgPool3d)
class QuantAdaptiveAvgPool3d(_QuantAvgPoolNd, nn.AdaptiveAvgPool3d):
    """`nn.AdaptiveAvgPool3d` with fake-quantized input and output."""
