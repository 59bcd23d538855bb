"""Progress outside a terminal: one plain line per epoch, never a ``\\r`` redraw."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning.app.module import Classifier
from qat_lightning.app.progress import EpochLines, progress_bar


def loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 6, generator=g), torch.arange(n) % 3), 8)


def test_a_run_outside_a_terminal_prints_one_line_per_epoch(capsys):
    optim = OmegaConf.create({"name": "adam", "lr": 0.01, "weight_decay": 0, "scheduler": "none"})
    module = Classifier(nn.Linear(6, 3), optim, num_classes=3)
    module.start_phase("qat", 0.01, 3)
    bar = progress_bar("auto", "qat")  # pytest's captured stdout is not a terminal
    assert isinstance(bar, EpochLines)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader(), loader(16))
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("qat epoch")]
    assert [line.split(":")[0] for line in lines] == [f"qat epoch {i}/3" for i in (1, 2, 3)]
    # each line carries the epoch's metrics, from the torchmetrics objects the module logs
    for line in lines:
        names = line.split(": ", 1)[1].split()[:-2][::2]  # "name value ... (1.2 s)"
        assert names == ["train_acc", "train_loss", "val_acc", "val_loss"], line
    final = trainer.callback_metrics
    assert f"val_acc {float(final['qat/val_acc']):.4f}" in lines[-1]
    assert f"train_acc {float(final['qat/train_acc_epoch']):.4f}" in lines[-1]


def test_a_terminal_gets_the_tqdm_bar(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", tty)
    assert isinstance(progress_bar("auto", "fp32"), TQDMProgressBar)
    assert isinstance(progress_bar("lines", "fp32"), EpochLines)
    assert progress_bar("none", "fp32") is None
