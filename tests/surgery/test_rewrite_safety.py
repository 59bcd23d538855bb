"""A rewrite must not change what a model computes: a traced graph keeps only the branches
taken while tracing, so blocks whose forward takes optional arguments keep their own forward
and their functional ops are reported as float."""

from __future__ import annotations

import torch
from surgery_cases import tiny_bert
from torch import nn

from qat_lightning.quant import Quantizer
from qat_lightning.surgery import quantize_model


def _quantization_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.enable_fake_quant(False)


class OptionalBias(nn.Module):
    """``if bias is None``: tracing passes a proxy for ``bias`` and keeps the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None:
            bias = torch.ones_like(x)
        return self.fc(x) + bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = OptionalBias()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))  # (bias left out)


def test_a_block_with_an_optional_argument_keeps_its_forward_and_is_reported() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    report = quantize_model(model)
    assert type(model.block) is OptionalBias
    assert any("'block'" in w and "bias=None" in w and "float" in w for w in report.warnings)
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_hugging_face_bert_runs_after_surgery_and_computes_what_it_did() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    report = quantize_model(model)
    # BertEmbeddings.forward branches on `token_type_ids is None`: it keeps its own forward
    assert type(model.embeddings).__name__ == "BertEmbeddings"
    assert any("'embeddings'" in w and "token_type_ids=None" in w for w in report.warnings)
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)
    with torch.no_grad():
        quantized = model(ids).last_hidden_state  # the first forward after surgery works
    assert quantized.shape == expected.shape and torch.isfinite(quantized).all()
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, expected)
