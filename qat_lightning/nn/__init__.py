"""Quantized modules: ``forward`` is fake quantization, ``quantized_forward`` integer simulation."""

from qat_lightning.nn.base import (
    QUANT_MODULES,
    QuantModule,
    quant_type_for,
    register_quant_module,
    requantize,
)
from qat_lightning.nn.linear import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

__all__ = [
    "QUANT_MODULES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QuantModule",
    "quant_type_for",
    "register_quant_module",
    "requantize",
]
