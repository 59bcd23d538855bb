"""qat_lightning: quantization-aware training for PyTorch Lightning.

The public API: a `QATCallback` for an existing Trainer; `quantize_model` and its config and
report for model surgery; `calibrate` for post-training quantization in one call; the
quantization core (`QuantScheme`, `Quantizer`, `QTensor`); and the export functions. Everything
else may change.
"""

from qat_lightning.callback import QATCallback, QATExportError
from qat_lightning.export import convert, export_onnx, load_quantized, save_quantized
from qat_lightning.nn import QuantModule, register_quant_module
from qat_lightning.quant import QTensor, Quantizer, QuantScheme
from qat_lightning.surgery import QuantConfig, QuantizationReport, calibrate, quantize_model

__all__ = [
    "QATCallback",
    "QATExportError",
    "QTensor",
    "QuantConfig",
    "QuantModule",
    "QuantScheme",
    "QuantizationReport",
    "Quantizer",
    "calibrate",
    "convert",
    "export_onnx",
    "load_quantized",
    "quantize_model",
    "register_quant_module",
    "save_quantized",
]
__version__ = "0.1.0"
