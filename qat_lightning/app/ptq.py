"""PTQ accuracy in every run, and ``qat_epochs=0`` as a PTQ-only run.

`PTQAccuracy` is a callback placed after `QATCallback`: Lightning calls ``on_train_start``
hooks in list order, so it runs right after the QAT callback's calibration and before any QAT
step. It evaluates the test set then, in eval mode (the integer simulation, like every other
accuracy the app reports), so ``ptq_accuracy`` is the very model QAT starts from: the same
calibration batches and schemes as the QAT run. With ``stop=True`` (``qat_epochs=0``) it then
stops the fit: no training step runs, and `QATCallback` exports the calibrated model at
``on_fit_end`` as it exports a QAT model.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from typing_extensions import override

from qat_lightning.surgery.modes import kept_modes

# a PTQ run has no QAT schedule: these milestones do not apply
_SCHEDULE = ("freeze_bn_at", "freeze_observers_at", "quant_delay")


class PTQAccuracy(Callback):
    """Test accuracy right after calibration; optionally stop before the first QAT step.

    Args:
        loader: the test loader (``(x, y)`` batches).
        stop: stop the fit after measuring (a PTQ-only run).
    """

    def __init__(self, loader: DataLoader, stop: bool = False) -> None:
        self.loader = loader
        self.stop = stop
        self.accuracy: float | None = None

    @override
    @torch.no_grad()
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:  # resumed mid-QAT: the model is no longer the PTQ one
            pl.utilities.rank_zero_info("PTQ accuracy: not measured (resumed from a checkpoint)")
            return
        correct, total = 0, 0
        with kept_modes(pl_module):
            for x, y in self.loader:
                logits = pl_module(x.to(pl_module.device))
                correct += int((logits.argmax(1).cpu() == y).sum())
                total += len(y)
        self.accuracy = correct / total if total else None
        shown = "n/a (empty test set)" if self.accuracy is None else f"{self.accuracy:.4f}"
        pl.utilities.rank_zero_info(f"PTQ accuracy (calibrated, before QAT): {shown}")
        if self.stop:
            trainer.should_stop = True


def ptq_quant_config(quant: DictConfig) -> DictConfig:
    """``quant`` for a PTQ-only run: the same schemes and calibration, no QAT schedule."""
    node = OmegaConf.create(OmegaConf.to_container(quant, resolve=True))
    for key in _SCHEDULE:
        node[key] = None
    return node


def ptq_results(ptq: PTQAccuracy, qat_accuracy: float, epochs: int) -> dict[str, float | None]:
    """What ``results.json`` adds: the PTQ accuracy, and the gain QAT gave over it."""
    gain = None if ptq.accuracy is None or epochs == 0 else qat_accuracy - ptq.accuracy
    return {"ptq_accuracy": ptq.accuracy, "qat_gain": gain}
