"""A layer whose weight the model reads outside the layer's own forward
(``F.linear(x, self.proj.weight, self.proj.bias)``, as torchvision's Swin attention does; Swin
has its own quantized family now, tests/export/test_swin_attention.py) stays float,
and the report says why: at `quantize_model` where the graph shows it, after calibration where
it does not. Never an uncalibrated quantizer at `convert`, never an eval that runs float while
claiming integers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import convert
from qat_lightning.app.models import ResNetCifar
from qat_lightning.callback.health import named_quantizers
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import calibrate, quantize_model
from qat_lightning.surgery.outside_reads import revert_unobserved

REASON = "its weight is read outside its forward"


class ReadsWeight(nn.Module):
    """A user model that applies ``proj`` through its weight, never calling it."""

    def __init__(self, branch: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if self.branch and bool(h.sum() > -1e9):  # data-dependent: torch.fx cannot trace it
            h = h * 1.0
        return self.head(F.linear(h, self.proj.weight, self.proj.bias))


def _batches() -> list[torch.Tensor]:
    return [torch.randn(32, 8) for _ in range(3)]


def _check_integer_eval_is_convert(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    converted = convert(model)  # raised NotCalibratedError before
    with torch.no_grad():
        assert torch.equal(model(x), converted(x))


def test_a_weight_read_in_a_traced_forward_stays_float_from_quantize_model() -> None:
    torch.manual_seed(0)
    model = ReadsWeight()
    with pytest.warns(UserWarning, match=rf"layer 'proj': {REASON}.*F?linear in the root"):
        report = calibrate(model, _batches())
    row = report.row("proj")
    assert row.status == "float" and row.after == "Linear" and REASON in row.note
    assert type(model.proj) is nn.Linear
    assert isinstance(model.fc, QuantModule) and isinstance(model.head, QuantModule)
    _check_integer_eval_is_convert(model, torch.randn(16, 8))


def test_a_weight_read_in_untraced_code_is_reverted_to_float_after_calibration() -> None:
    torch.manual_seed(0)
    model = ReadsWeight(branch=True)
    with pytest.warns(UserWarning, match=rf"layer 'proj' \(QuantLinear\).*{REASON}"):
        report = calibrate(model, _batches())
    assert type(model.proj) is nn.Linear  # swapped back, with its own Parameters
    row = report.row("proj")
    assert row.status == "float" and row.after == "Linear" and REASON in row.note
    assert row.params is None and row.inputs is None
    assert report.row("head").status == "quantized"
    _check_integer_eval_is_convert(model, torch.randn(16, 8))


def test_a_reverted_producer_leaves_its_consumers_a_float_input_not_a_dead_encoding() -> None:
    # Surgery drops the input quantizer of a layer whose producer's output quantizer has the
    # same encoding. When that producer observes nothing and is reverted to float, the
    # consumer must not keep pointing at the dead quantizer (convert used to fail on it).
    torch.manual_seed(0)
    model = ResNetCifar(3, 10, width=8, blocks=1)
    quantize_model(model)
    model.train()
    add_quantizers = {id(q) for q in model.layers[0].add.quantizers()}
    for _, quantizer in named_quantizers(model):
        quantizer.enable_observer(id(quantizer) not in add_quantizers)
        quantizer.enable_fake_quant(False)
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16))  # the first block's add observes nothing
    with pytest.warns(UserWarning, match=r"layer 'layers.1.conv1' .*comes from 'layers.0.add'"):
        assert revert_unobserved(model) == ["layers.0.add"]
    for _, quantizer in named_quantizers(model):
        quantizer.update_encodings()
        quantizer.enable_fake_quant(True)
    _check_integer_eval_is_convert(model, torch.randn(4, 3, 16, 16))
