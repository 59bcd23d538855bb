"""Acceptance: transformers nobody here wrote (`nn.TransformerEncoder`, torchvision's
`VisionTransformer`, random init, small configs) quantize fully at W8A8, train, evaluate as the
integer model (never torch's fused fast path), convert bit for bit and run in onnxruntime
with integer kernels for every projection and both attention matmuls."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from export_helpers import agreement, optimized_op_types, ort_run, output_lsb
from torch import nn

from qat_lightning import convert, export_onnx
from qat_lightning.export.report import layer_report
from qat_lightning.nn import QuantModule, QuantMultiheadAttention
from qat_lightning.surgery import calibrate


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises it
    return model


MODELS = {"transformer_encoder": (EncoderClassifier, (6, 32)), "vit": (_vit, (3, 32, 32))}


def _float_weights_left(model: nn.Module, report) -> list[str]:
    """Linear / MultiheadAttention modules left float without a row saying why."""
    explained = {row.name for row in report.rows if row.status != "quantized" and row.note}
    return [
        name
        for name, m in model.named_modules()
        if type(m) in (nn.Linear, nn.MultiheadAttention) and name not in explained
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_goes_w8a8_from_surgery_to_onnxruntime(name, tmp_path) -> None:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    float_model = copy.deepcopy(model).eval()
    report = calibrate(model, [torch.randn(16, *shape) for _ in range(8)])
    assert not _float_weights_left(model, report)
    attention = [m for m in model.modules() if isinstance(m, QuantMultiheadAttention)]
    assert len(attention) == 2

    model.train()  # a QAT step reaches every weight
    nn.functional.cross_entropy(
        model(torch.randn(8, *shape)), torch.randint(0, 10, (8,))
    ).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    model.zero_grad()

    model.eval()
    x = torch.randn(256, *shape)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in attention[0].qk.modules()]
    converted = convert(model)
    with torch.no_grad():
        integer, expected, reference = model(x), converted(x), float_model(x)
    for hook in hooks:
        hook.remove()
    assert calls, "the quantized attention matmul was bypassed in eval"
    assert torch.equal(integer, expected)  # integer eval is the converted model, bit for bit
    assert not torch.equal(integer, reference)  # ... and not float (no fused fast path)
    assert (integer - reference).norm() < 0.2 * reference.norm()
    floats = layer_report(converted)["float_layers"]
    assert not [f for f in floats if "attention" in f or "attn" in f], floats  # codes only

    path = export_onnx(model, torch.randn(2, *shape), tmp_path / "int8.onnx")
    within, top1 = agreement(ort_run(path, x), expected.numpy(), output_lsb(converted))
    assert top1 >= 0.99, (within, top1)
    ops = optimized_op_types(path, tmp_path)
    projections = 2 * 6  # q, k, v, out, two MLP linears per layer
    assert (
        ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"] >= projections + 2 * 2 + 1
    )
    assert ops["QLinearMatMul"] >= 2 * 2, ops  # q·kᵀ and p·v of both layers
    assert ops["MatMul"] + ops["FusedMatMul"] + ops["Gemm"] == 0, ops  # no float matmul left

    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(float_model, (torch.randn(2, *shape),), str(fp32_path), external_data=False)
    assert os.path.getsize(path) <= 0.30 * os.path.getsize(fp32_path)
    assert not any(isinstance(m, QuantModule) for m in float_model.modules())
