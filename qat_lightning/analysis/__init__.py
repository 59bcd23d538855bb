"""Analysis: per-layer sensitivity and mixed-precision search (uses surgery and nn; no Lightning).

- `sensitivity(model, batches, metric)`: each layer quantized alone at each bit width, the rest
  float; the metric change and the output SQNR per layer (`SensitivityResult`).
- `mixed_precision(result, budget, activation_budget=None)`: per-layer weight bit widths within
  a weight size budget (and, with ``activation_budget``, activation bit widths within a budget
  of quantized activation bytes per sample) at the least summed sensitivity (exact); its
  ``overrides`` go to `QATCallback` / `quantize_model`.
"""

from qat_lightning.analysis.mixed_precision import MixedPrecisionResult, mixed_precision
from qat_lightning.analysis.result import LayerSensitivity, SensitivityResult
from qat_lightning.analysis.sensitivity import sensitivity

__all__ = [
    "LayerSensitivity",
    "MixedPrecisionResult",
    "SensitivityResult",
    "mixed_precision",
    "sensitivity",
]
