"""QATCallback: quantization-aware training on a Lightning Trainer."""

from qat_lightning.callback.exporting import QATExportError
from qat_lightning.callback.qat import QATCallback
from qat_lightning.callback.schedule import Milestone

__all__ = ["Milestone", "QATCallback", "QATExportError"]
