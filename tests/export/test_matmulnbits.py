"""Weight-only per-group Linear -> onnxruntime's MatMulNBits (com.microsoft), int4 and int8."""

from __future__ import annotations

import onnx
import pytest
import torch
from export_helpers import TinyLM, optimized_op_types, ort_run
from torch import nn

from qat_lightning.export import ExportError, convert, export_onnx
from qat_lightning.export.grouped import MatMulNBitsLinear
from qat_lightning.surgery import QuantConfig, quantize_model


def _mlp(params: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
    quantize_model(model, QuantConfig(inputs=None, params=params))  # weight-only
    model.train()
    model(torch.randn(4, 64))  # the weight observers run in training
    return model.eval()


SCHEMES = {
    "w4_sym_g32": {"bits": 4, "granularity": "per_group", "group_size": 32},
    "w4_affine_g16": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 16},
    "w8_sym_g32": {"bits": 8, "granularity": "per_group", "group_size": 32},
    "w3_sym_g64": {"bits": 3, "granularity": "per_group", "group_size": 64},
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_onnxruntime_runs_matmulnbits_and_agrees_with_convert(name, tmp_path) -> None:
    model = _mlp(SCHEMES[name])
    converted = convert(model)
    assert isinstance(converted[0], MatMulNBitsLinear)
    x = torch.randn(2, 7, 64)  # batch, tokens, features
    path = export_onnx(converted, x, tmp_path / "m.onnx")
    ops = optimized_op_types(path, tmp_path)
    assert ops["MatMulNBits"] == 2 and "DequantizeLinear" not in ops, ops
    for batch in (x, torch.randn(5, 7, 64) * 3):  # the batch dimension is dynamic
        with torch.no_grad():
            expected = converted(batch).numpy()
        got = ort_run(path, batch)
        torch.testing.assert_close(
            torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-4
        )
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.995


def test_w4_g32_weights_take_at_most_16_percent_of_fp32(tmp_path) -> None:
    model = _mlp(SCHEMES["w4_sym_g32"])
    path = export_onnx(convert(model), torch.randn(2, 64), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: i for i in graph.initializer}
    weight_bytes = sum(
        len(inits[name].raw_data) for n in nodes for name in n.input[1:4] if name in inits
    )
    fp32_bytes = 4 * (64 * 128 + 128 * 64)
    assert weight_bytes <= 0.16 * fp32_bytes, weight_bytes / fp32_bytes


def test_a_group_size_matmulnbits_cannot_take_is_refused_naming_the_layer(tmp_path) -> None:
    model = _mlp({"bits": 4, "granularity": "per_group", "group_size": 8})
    converted = convert(model)  # the torch model is fine
    with torch.no_grad():
        converted(torch.randn(2, 64))
    with pytest.raises(ExportError, match=r"layer .0.*group_size=8.*power of two >= 16"):
        export_onnx(converted, torch.randn(2, 64), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_only_token_model_exports_embedding_and_linears(bits, tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    params = {"bits": bits, "granularity": "per_group", "group_size": 32}
    quantize_model(model, QuantConfig(inputs=None, params=params))
    idx = torch.randint(0, 50, (3, 16))
    model.train()
    model(idx)
    model.eval()
    converted = convert(model)
    with torch.no_grad():
        expected = converted(idx).numpy()
        torch.testing.assert_close(torch.from_numpy(expected), model(idx), rtol=0, atol=0)
    path = export_onnx(converted, idx, tmp_path / "lm.onnx")
    blocked = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
    assert len(blocked) == 1 and {a.name: a.i for a in blocked[0].attribute}["block_size"] == 32
    assert optimized_op_types(path, tmp_path)["MatMulNBits"] == 3
    got = ort_run(path, idx)
    torch.testing.assert_close(
        torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-4, atol=1e-4
    )
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.995
