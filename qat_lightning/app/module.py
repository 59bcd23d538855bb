"""`Classifier`: the plain LightningModule ``qat-train`` trains, first in float, then with QAT.

It knows nothing of quantization: `QATCallback` swaps its layers. ``phase`` only prefixes the
metric names (``fp32/val_acc``, ``qat/val_acc``), so both phases share one logger.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class Classifier(pl.LightningModule):
    """Cross-entropy classification around ``model``.

    Args:
        model: the network (its outputs are logits).
        optim: the ``optim`` config node (name, lr, weight_decay, momentum, scheduler).
        epochs: epochs of the current phase (for the cosine schedule).
    """

    def __init__(self, model: nn.Module, optim: Any, epochs: int = 1) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.lr = float(optim.lr)
        self.epochs = epochs
        self.phase = "fp32"

    def start_phase(self, phase: str, lr: float, epochs: int) -> None:
        """Switch to the next phase: new metric prefix, learning rate and schedule length."""
        self.phase, self.lr, self.epochs = phase, lr, epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{self.phase}/train_loss", loss, prog_bar=True)
        self.log(f"{self.phase}/train_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{self.phase}/val_loss", F.cross_entropy(logits, y))
        self.log(f"{self.phase}/val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        name, decay = self.optim.name, float(self.optim.weight_decay)
        params = [p for p in self.parameters() if p.requires_grad]
        if name == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=float(self.optim.momentum), weight_decay=decay
            )
        elif name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=decay)
        else:
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=decay)
        if self.optim.scheduler != "cosine":
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
