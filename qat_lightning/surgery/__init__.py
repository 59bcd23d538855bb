"""Model surgery: `quantize_model` fuses, swaps and prunes a float model for QAT in place."""

from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.quantize import quantize_model
from qat_lightning.surgery.report import LayerRow, QuantizationReport

__all__ = ["LayerRow", "QuantConfig", "QuantizationReport", "quantize_model"]
