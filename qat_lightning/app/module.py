"""`Classifier`: the plain LightningModule ``qat-train`` trains, first in float, then with QAT.

It knows nothing of quantization: `QATCallback` swaps its layers. ``phase`` only prefixes the
metric names (``fp32/val_acc``, ``qat/val_acc``), so both phases share one logger. Accuracy is a
torchmetrics `MulticlassAccuracy` object: logged as the object, Lightning accumulates it over the
epoch and syncs it across ranks (under DDP ``val_acc`` is the whole validation set's, not one
rank's); the mean losses are logged with ``sync_dist=True``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override


class Classifier(pl.LightningModule):
    """Cross-entropy classification around ``model``.

    Args:
        model: the network (its outputs are logits).
        optim: the ``optim`` config node (name, lr, weight_decay, momentum, scheduler).
        epochs: epochs of the current phase (for the cosine schedule).
        num_classes: number of classes (for the accuracy metrics).
    """

    def __init__(
        self, model: nn.Module, optim: Any, epochs: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.lr = float(optim.lr)
        self.epochs = epochs
        self.phase = "fp32"
        # top-1 over all samples (micro), as `train.accuracy` computes it on the test set
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def start_phase(self, phase: str, lr: float, epochs: int) -> None:
        """Switch to the next phase: new metric prefix, learning rate and schedule length."""
        self.phase, self.lr, self.epochs = phase, lr, epochs

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{self.phase}/train_loss", loss, prog_bar=True, sync_dist=True)
        self.train_acc(logits, y)
        self.log(f"{self.phase}/train_acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{self.phase}/val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log(f"{self.phase}/val_acc", self.val_acc, prog_bar=True)

    @override
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
