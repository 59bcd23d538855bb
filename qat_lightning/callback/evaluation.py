"""What QATCallback does around validation, test and predict.

Evaluation inside ``fit`` must not feed the observers (the encodings would learn from the
validation set), and it runs either the integer simulation (eval mode's default: the exported
model's integer arithmetic) or, with ``integer_eval=False``, float32 fake quant.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning.pytorch as pl

from qat_lightning.callback.health import named_quantizers
from qat_lightning.nn import fake_quant_eval


class EvaluationHooks:
    """Mixin of `QATCallback`: the ``on_{validation,test,predict}_{start,end}`` hooks. The
    class using it sets ``integer_eval`` and calls ``EvaluationHooks.__init__``."""

    integer_eval: bool

    def __init__(self) -> None:
        self._eval_context = contextlib.ExitStack()
        self._eval_observer_state: list[tuple[Any, bool]] = []

    def _pause_observers(self, pl_module: pl.LightningModule) -> None:
        if not self.integer_eval:
            self._eval_context.enter_context(fake_quant_eval())
        self._eval_observer_state = []
        for _, quantizer in named_quantizers(pl_module):
            self._eval_observer_state.append((quantizer, bool(quantizer.observer_enabled)))
            quantizer.enable_observer(False)

    def _resume_observers(self) -> None:
        self._eval_context.close()
        for quantizer, enabled in self._eval_observer_state:
            quantizer.enable_observer(enabled)
        self._eval_observer_state = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause_observers(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume_observers()
