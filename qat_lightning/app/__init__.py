"""The ``qat-train`` Hydra app: structured configs, data, models, `train`, and ``qat-report``.

`train(cfg)` runs one job from a composed config; ``qat_lightning.app.main`` is the Hydra entry
point around it. The configs live in ``conf/`` at the top of the repository (see
``qat_lightning.app.main``). Names are imported on first use, so that importing the package
imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "qat_lightning.app.config",
    "QuantSchemeConfig": "qat_lightning.app.config",
    "register_configs": "qat_lightning.app.config",
    "ConfigError": "qat_lightning.app.validation",
    "validate": "qat_lightning.app.validation",
    "train": "qat_lightning.app.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qat_lightning.app' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
