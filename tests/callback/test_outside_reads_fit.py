"""Through `QATCallback` + `Trainer.fit`: a layer whose weight the model reads outside the
layer's forward, in code torch.fx cannot trace, is found at calibration (it observed nothing),
swapped back to float with a warning and a float row in the callback's report, and the fit
exports the rest of the model as integers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning_modules import ImageClassifier
from torch import nn

from qat_lightning import QATCallback
from qat_lightning.nn import QuantModule

REASON = "its weight is read outside its forward"


class ReadsWeightNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x.flatten(1)))
        if h.dim() == 2:  # control flow on a traced value: torch.fx cannot trace it
            h = F.linear(h, self.proj.weight, self.proj.bias)
        return self.head(h)


def test_fit_reverts_a_layer_read_outside_its_forward_and_exports(make_trainer, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(ReadsWeightNet())
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export")
    with pytest.warns(UserWarning, match=rf"layer 'net.proj' \(QuantLinear\).*{REASON}"):
        make_trainer(max_steps=3, limit_val_batches=1, callbacks=[qat]).fit(model)
    assert type(model.net.proj) is nn.Linear
    assert isinstance(model.net.fc, QuantModule) and isinstance(model.net.head, QuantModule)
    row = qat.report.row("net.proj")
    assert row.status == "float" and REASON in row.note
    assert qat.export_paths["onnx"].exists()  # convert found no uncalibrated quantizer
