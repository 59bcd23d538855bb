"""write_model_card: the export directory's README.md says what the model is and how to run it."""

from __future__ import annotations

import re

import torch
from export_helpers import W8, small_cnn

from qat_lightning.export import (
    convert,
    export_onnx,
    layer_report,
    save_quantized,
    write_model_card,
)


def _run_block(card: str) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    return block


def test_the_card_holds_the_layer_table_metrics_and_lines_that_run(tmp_path, monkeypatch) -> None:
    model = small_cnn(params=W8.replace(bits=4))
    paths = {
        "onnx": export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "model_int.onnx"),
        "native": save_quantized(model, tmp_path / "native"),
    }
    card_path = write_model_card(tmp_path, model, paths, metrics={"val_acc": 0.91234})
    card = card_path.read_text()
    assert card_path == tmp_path / "README.md"
    assert "3 of 3 layers compute in integers (4-bit weights, 8-bit activations)" in card
    assert "| val_acc | 0.9123 |" in card
    for row in layer_report(convert(model))["layers"]:
        assert f"| {row['name']} | {row['type']} | integer | 4 | {row['params']} |" in card
    assert "- `model_int.onnx` (onnx," in card and "- `native` (native," in card
    # The lines to run it work as written, from the export directory.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_run_block(card), namespace)
    assert namespace["logits"].shape == (1, 10)


def test_without_onnx_or_metrics_the_card_says_so(tmp_path) -> None:
    model = small_cnn()
    card = write_model_card(tmp_path, model, {"native": save_quantized(model, tmp_path / "n")})
    text = card.read_text()
    assert "Not recorded with this export." in text
    assert "```python" not in text  # nothing to run without the ONNX file
