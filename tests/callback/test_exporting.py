"""export_trained: the end-of-fit export writes the files, the model card and the metrics."""

from __future__ import annotations

import json
from contextlib import ExitStack

import onnx
import torch
from torch import nn

from qat_lightning.callback.exporting import export_trained
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import quantize_model


def test_the_export_directory_gets_a_model_card_and_the_metrics(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    quantize_model(model, {})
    model.eval()
    with ExitStack() as stack, torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantModule):
                stack.enter_context(module.compute_encodings())
        model(torch.randn(16, 6))
    paths = export_trained(
        model, torch.randn(2, 6), tmp_path, ["onnx", "native"], metrics={"val_acc": 0.75}
    )
    assert set(paths) == {"onnx", "native"}
    props = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    assert json.loads(props["metrics"]) == {"val_acc": 0.75}
    card = (tmp_path / "README.md").read_text()
    assert "| val_acc | 0.7500 |" in card
    assert 'OnnxModel("model_int.onnx")' in card
