"""Progress of ``qat-train`` when nobody watches a terminal: one line per epoch.

A tqdm bar redraws itself with ``\\r`` many times a second; in a log file (a sweep job, CI, a
``nohup`` run) that is kilobytes of half-lines. `EpochLines` is a Lightning progress bar (a
`ProgressBar` subclass, so ``enable_progress_bar`` and ``trainer.progress_bar_callback`` treat it
as the bar) that prints one line at the end of every epoch with the epoch's metrics, and a line
every ``every_s`` seconds inside an epoch that takes longer. `progress_bar` picks it when
standard output is not a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override


class EpochLines(ProgressBar):
    """One plain line per epoch: ``fp32 epoch 2/6: train_loss 0.4123  val_acc 0.9310 (3.1 s)``.

    Args:
        phase: the name the lines start with (``fp32``, ``qat``).
        every_s: inside an epoch, print a progress line when this many seconds passed since the
            last line (long epochs).
    """

    def __init__(self, phase: str = "train", every_s: float = 30.0) -> None:
        super().__init__()
        self.phase = phase
        self.every_s = every_s
        self._enabled = True
        self._epoch_start = self._last_line = 0.0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    def _metrics(self, trainer: pl.Trainer, epoch_end: bool) -> str:
        """``name value`` pairs: at an epoch's end its epoch means (``*_epoch`` over the step
        value of a metric logged both ways); inside an epoch the training metrics so far."""
        values: dict[str, float] = {}
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step") or getattr(value, "numel", lambda: 1)() != 1:
                continue
            per_epoch = key.endswith("_epoch")
            name = key.removesuffix("_epoch").removeprefix(f"{self.phase}/")
            if not epoch_end and (per_epoch or "train" not in name):
                continue  # last epoch's figures, not this one's
            if per_epoch or name not in values:
                values[name] = float(value)
        return "  ".join(f"{name} {value:.4f}" for name, value in sorted(values.items()))

    def _line(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, file=sys.stdout, flush=True)
            self._last_line = time.monotonic()

    def _epoch(self, trainer: pl.Trainer) -> str:
        total = "?" if trainer.max_epochs in (None, -1) else trainer.max_epochs
        return f"{self.phase} epoch {trainer.current_epoch + 1}/{total}"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if time.monotonic() - self._last_line < self.every_s:
            return
        total = self.total_train_batches
        done = batch_idx + 1
        share = f"{100 * done / total:.0f}% " if total not in (0, float("inf")) else ""
        metrics = self._metrics(trainer, epoch_end=False)
        self._line(f"{self._epoch(trainer)}: {share}({done} batches) {metrics}")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.monotonic() - self._epoch_start
        self._line(f"{self._epoch(trainer)}: {self._metrics(trainer, True)} ({seconds:.1f} s)")


def progress_bar(kind: str, phase: str) -> ProgressBar | None:
    """The progress bar for ``callbacks.progress_bar``: ``auto`` is a tqdm bar in a terminal and
    `EpochLines` elsewhere; ``tqdm``, ``rich``, ``lines`` force one; ``none`` is no progress."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind == "auto":
        kind = "tqdm" if sys.stdout.isatty() else "lines"
    if kind == "tqdm":
        return TQDMProgressBar()
    if kind == "rich":
        return RichProgressBar()
    if kind == "lines":
        return EpochLines(phase)
    return None
