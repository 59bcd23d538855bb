"""The quantization core: schemes, observers, quantizers and the math they share."""

from qat_lightning.quant.functional import (
    code_dtype,
    dequantize_ste,
    encodings_from_range,
    fake_quantize,
    quantize_ste,
)
from qat_lightning.quant.observers import Observer, make_observer
from qat_lightning.quant.qtensor import QTensor
from qat_lightning.quant.quantizer import Quantizer
from qat_lightning.quant.scheme import QuantScheme

__all__ = [
    "Observer",
    "QTensor",
    "QuantScheme",
    "Quantizer",
    "code_dtype",
    "dequantize_ste",
    "encodings_from_range",
    "fake_quantize",
    "make_observer",
    "quantize_ste",
]
