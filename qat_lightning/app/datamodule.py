"""`ImageDataModule`: train / validation / test loaders for one of `DATASETS`.

Images stay uint8 in memory and are normalised per sample, so full Fashion-MNIST costs 47 MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qat_lightning.app.data import (
    DATASETS,
    DatasetInfo,
    read_cifar10,
    read_digits,
    read_fashion_mnist,
)


class ImageDataset(Dataset):
    """uint8 images normalised on access; optional CIFAR augmentation (pad-4 crop, flip)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, augment: bool = False
    ) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.scale = info.scale
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float() / self.scale
        if self.augment:
            size = x.shape[-1]
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = padded[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[index]


def _subset(n: int, limit: int | None, seed: int) -> torch.Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order if limit is None else order[:limit]


class ImageDataModule(pl.LightningDataModule):
    """Train / validation / test splits of one of `DATASETS`, from the ``data`` config node.

    The validation split is ``val_fraction`` of the training images (seeded); digits also
    holds out ``test_fraction`` of its 1797 images as the test set.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = DATASETS[cfg.name]
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None

    def _load(self) -> tuple[np.ndarray, ...]:
        if self.cfg.name == "digits":
            images, labels = read_digits()
            order = _subset(len(labels), None, self.cfg.seed).numpy()
            n_test = round(self.cfg.test_fraction * len(labels))
            test, train = order[:n_test], order[n_test:]
            return images[train], labels[train], images[test], labels[test]
        root = Path(str(self.cfg.root)).expanduser()
        return read_fashion_mnist(root) if self.cfg.name == "fashion_mnist" else read_cifar10(root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, test_x, test_y = (
            torch.from_numpy(np.ascontiguousarray(a)) for a in self._load()
        )
        order = _subset(len(train_y), None, self.cfg.seed + 1)
        n_val = round(self.cfg.val_fraction * len(train_y))
        val, train = order[:n_val], order[n_val:]
        if self.cfg.max_train_samples is not None:
            train = train[: self.cfg.max_train_samples]
        test = _subset(len(test_y), self.cfg.max_test_samples, self.cfg.seed + 2)
        augment = bool(getattr(self.cfg, "augment", False))
        self.train_set = ImageDataset(train_x[train], train_y[train], self.info, augment)
        self.val_set = ImageDataset(train_x[val], train_y[val], self.info)
        self.test_set = ImageDataset(test_x[test], test_y[test], self.info)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(self.cfg.seed) if train else None,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
