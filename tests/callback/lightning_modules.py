"""Small LightningModules the callback tests train: written to look like a user's code."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def image_data(n: int = 64, size: int = 16, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class ImageClassifier(pl.LightningModule):
    """A LightningModule around any image backbone, as a user writes one."""

    def __init__(
        self, backbone: nn.Module | None = None, n: int = 64, batch_size: int = 16, lr: float = 0.05
    ) -> None:
        super().__init__()
        self.net = backbone if backbone is not None else small_cnn()
        self.n, self.batch_size, self.lr = n, batch_size, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(image_data(self.n), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(image_data(32, seed=1), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(image_data(32, seed=2), batch_size=self.batch_size)


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class ConfigureModelClassifier(ImageClassifier):
    """Builds its layers in configure_model, as large-model code does."""

    def __init__(self, **kwargs) -> None:
        super().__init__(backbone=nn.Identity(), **kwargs)
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = small_cnn()


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs
