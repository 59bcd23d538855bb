"""QATCallback with LLM-style schemes on a small token model: int4 per-group weights with
dynamic per-token int8 activations (8da4w) or float activations (weight-only)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning.callback import QATCallback
from qat_lightning.export import convert
from qat_lightning.quant import Quantizer

W4G16 = {"bits": 4, "granularity": "per_group", "group_size": 16}
SCHEMES = {
    "8da4w": ({"dynamic": True, "granularity": "per_token", "signed": True}, W4G16),
    "w4g16_only": (None, W4G16),
}


def tokens(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (n, 8), generator=g)
    return TensorDataset(x, (x * 7 + 3) % 32)  # a learnable token map


class TokenModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(32, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(tokens(64, 0), batch_size=16)

    def val_dataloader(self):
        return DataLoader(tokens(32, 1), batch_size=16)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_fit_calibrates_the_weights_and_resumes_exactly(name, make_trainer, tmp_path):
    inputs, params = SCHEMES[name]
    model = TokenModel()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    qat = QATCallback(inputs=inputs, params=params, calibration_batches=2, export_formats=())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback, no uncalibrated quantizer
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        warnings.filterwarnings("ignore", message=".*left float.*|.*float.*GELU.*")
        make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[qat, ckpt]).fit(model)
    assert qat.calibrated
    weights = [m for n, m in model.named_modules() if n.endswith("param_quantizers.weight")]
    assert len(weights) == 3 and all(q.is_initialized for q in weights)
    assert tuple(model.net[1].param_quantizers["weight"].scale.shape) == (64, 2)
    dynamic = [m for m in model.modules() if isinstance(m, Quantizer) and m.scheme.dynamic]
    assert bool(dynamic) == (inputs is not None)

    model.eval()
    x = tokens(8, 2).tensors[0]
    with torch.no_grad():
        expected = model(x)  # the integer simulation
        torch.testing.assert_close(convert(model)(x), expected, rtol=0, atol=0)

    fresh = TokenModel()
    make_trainer(callbacks=[QATCallback(inputs=inputs, params=params, export_formats=())]).validate(
        fresh, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
