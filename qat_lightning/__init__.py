"""qat_lightning: quantization-aware training for PyTorch Lightning."""

from qat_lightning.quant import QTensor, Quantizer, QuantScheme

__all__ = ["QTensor", "QuantScheme", "Quantizer"]
__version__ = "0.1.0"
