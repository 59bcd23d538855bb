"""Model surgery: `quantize_model` fuses, swaps and prunes a float model for QAT in place;
`calibrate` does that and calibrates it (post-training quantization)."""

from qat_lightning.surgery.calibrate import calibrate, compute_encodings
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.quantize import quantize_model
from qat_lightning.surgery.report import LayerRow, QuantizationReport

__all__ = [
    "LayerRow",
    "QuantConfig",
    "QuantizationReport",
    "calibrate",
    "compute_encodings",
    "quantize_model",
]
