"""Under autocast (Lightning's ``precision="bf16-mixed"``) eval mode still runs the exact
integer simulation: what validation reports is what `convert`'s model computes, bit for bit."""

from __future__ import annotations

from contextlib import ExitStack

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import QATCallback
from qat_lightning.export import convert
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import quantize_model


class Residual(nn.Module):
    """Conv-BN-ReLU, a residual add, two Linear layers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(16, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(F.relu(self.hidden(self.pool(y).flatten(1))))


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized(skip: tuple[str, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = Residual().eval()
    quantize_model(model, skip=list(skip))
    with ExitStack() as stack, torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantModule):
                stack.enter_context(m.compute_encodings())
        for seed in range(2):
            model(_data(16, seed))
    return model


def test_eval_under_bf16_autocast_is_the_converted_model_bit_for_bit() -> None:
    model = _quantized(skip=())
    converted = convert(model)
    x = _data(32, 5)
    with torch.no_grad():
        reference = converted(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            evaluated = model(x)
            converted_under_autocast = converted(x)
    assert evaluated.dtype == torch.float32
    assert torch.equal(evaluated, reference)
    assert torch.equal(converted_under_autocast, reference)


def test_a_bfloat16_input_from_a_float_layer_still_runs_the_integer_simulation() -> None:
    # "hidden" stays float: autocast runs it in bfloat16, and the quantized head after it
    # takes that bfloat16 tensor as the converted model does (float layers may differ from
    # float32; the quantized ones must not)
    model = _quantized(skip=("hidden",))
    converted = convert(model)
    x = _data(32, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated, expected = model(x), converted(x)
    assert evaluated.dtype == torch.float32  # the quantized head ran as integers
    assert torch.equal(evaluated, expected)


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Residual()
        self.validation_outputs: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.validation_outputs.append(self(batch[0]).detach().float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(seed: int) -> DataLoader:
    x = _data(16, seed)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_bf16_mixed_validation_reports_what_the_converted_model_computes(tmp_path) -> None:
    module = _Classifier()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[QATCallback(calibration_batches=1)],
    )
    trainer.fit(module, train_dataloaders=_loader(0))
    module.validation_outputs.clear()
    trainer.validate(module, dataloaders=_loader(1), verbose=False)
    converted = convert(module.net)
    with torch.no_grad():
        expected = converted(_data(16, 1))
    assert torch.equal(torch.cat(module.validation_outputs), expected)
