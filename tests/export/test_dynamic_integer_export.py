"""Dynamic int8 activations (per tensor, per token) and per-group / per-channel int8 and int4
weights (8da4w) export as ``MatMulInteger``: onnxruntime runs integer kernels, and its logits
agree with `convert`'s integer simulation to float tolerance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_helpers import TinyLM, optimized_op_types, ort_run, ort_session
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.export import ExportError, convert, export_onnx
from qat_lightning.export.grouped import GroupedIntegerLinear
from qat_lightning.surgery import QuantConfig, quantize_model

INPUTS = {
    "8da_token_affine": {
        "bits": 8,
        "symmetric": False,
        "signed": True,
        "granularity": "per_token",
        "dynamic": True,
    },
    "8da_token_sym": {"bits": 8, "signed": True, "granularity": "per_token", "dynamic": True},
    "8da_tensor_u8": {"bits": 8, "symmetric": False, "signed": False, "dynamic": True},
    "static_u8": {"bits": 8, "symmetric": False, "signed": False},
}
PARAMS = {
    "w4_g32": {"bits": 4, "granularity": "per_group", "group_size": 32},
    "w8_channel": {"bits": 8, "granularity": "per_channel"},
    "w8_g32_affine": {"bits": 8, "symmetric": False, "granularity": "per_group", "group_size": 32},
    "w4_channel_affine": {"bits": 4, "symmetric": False, "granularity": "per_channel"},
}
CASES = [
    ("8da_token_affine", "w4_g32"),  # torchao's 8da4w with the int8_dynamic preset
    ("8da_token_sym", "w4_g32"),
    ("8da_token_affine", "w8_channel"),
    ("8da_tensor_u8", "w8_channel"),
    ("8da_tensor_u8", "w8_g32_affine"),
    ("8da_token_sym", "w4_channel_affine"),
    ("static_u8", "w4_g32"),  # per-group weights with static activations
]
INTEGER_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def _tiny_lm(inputs: dict, params: dict) -> nn.Module:
    torch.manual_seed(0)
    model = TinyLM()
    quantize_model(model, QuantConfig(inputs=inputs, params=params))
    model.train()
    for _ in range(2):  # the weight (and any static activation) observers run in training
        model(torch.randint(0, 50, (4, 16)))
    return model.eval()


def _integer_ops(path, tmp_path) -> dict[str, int]:
    ops = optimized_op_types(path, tmp_path)
    assert not {"MatMul", "Gemm", "FusedMatMul"} & set(ops), ops  # no float matmul left
    return {k: v for k, v in ops.items() if k in INTEGER_MATMULS}


def _agree(got: np.ndarray, expected: np.ndarray) -> None:
    """Float tolerance, token by token; argmax agreement >= 99.5 %.

    A token may be off by more where an activation code lies on a rounding boundary and
    onnxruntime's float ops (its GELU) round one ulp differently from torch's, so that code
    moves one step (a layer alone, fed the very same floats, agrees on every code:
    `test_one_8da4w_layer_matches_the_integer_simulation_on_any_input`)."""
    scale = 1.0 + float(np.abs(expected).max())
    error = np.abs(got - expected)
    assert (error.max(-1) <= 1e-5 * scale).mean() >= 0.9, error.max(-1)
    assert error.max() <= 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.995


@pytest.mark.parametrize(("inputs", "params"), CASES)
def test_onnxruntime_runs_integer_matmuls_that_agree_with_convert(inputs, params, tmp_path):
    model = _tiny_lm(INPUTS[inputs], PARAMS[params])
    converted = convert(model)
    linears = [m for m in converted.modules() if isinstance(m, GroupedIntegerLinear)]
    assert len(linears) == 3
    idx = torch.randint(0, 50, (3, 16))
    path = export_onnx(converted, idx, tmp_path / "lm.onnx")
    ops = _integer_ops(path, tmp_path)
    assert sum(ops.values()) == 3, ops
    for batch in (idx, torch.randint(0, 50, (5, 9))):  # batch and sequence are dynamic
        with torch.no_grad():
            expected = converted(batch).numpy()
        _agree(ort_run(path, batch), expected)


def test_int4_weights_are_int4_in_the_file_and_int8_once_onnxruntime_loads_them(tmp_path):
    model = _tiny_lm(INPUTS["8da_token_affine"], PARAMS["w4_g32"])
    path = export_onnx(model, torch.randint(0, 50, (2, 8)), tmp_path / "lm.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    weights = [inits[producers[n.input[1]].input[0]] for n in matmuls]  # Cast(INT4 init)
    assert len(weights) == 3
    assert {i.data_type for i in weights} == {onnx.TensorProto.INT4}
    int32 = [i.name for i in inits.values() if i.data_type == onnx.TensorProto.INT32]
    assert not int32, int32  # the per-token column sums are graph ops, not stored
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized)
    graph = onnx.load(str(optimized)).graph
    folded = {i.name: i.data_type for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMulInteger":  # its weight: a constant int8 initializer
            assert folded[node.input[1]] == onnx.TensorProto.INT8, node.input[1]
    assert ops_of(graph)["ReduceSum"] == 3  # one per layer (its groups); column sums folded
    linear_params = 64 * 128 + 128 * 64 + 64 * 50
    stored = sum(len(i.raw_data) for i in weights)
    assert stored <= linear_params / 2 + 3  # 4 bits a weight (one pad nibble per tensor)
    scales = [i for name, i in inits.items() if name.endswith("mmi_weight_scale")]
    assert len(scales) == 3 and all(i.data_type == onnx.TensorProto.FLOAT for i in scales)
    with_scales = stored + sum(len(i.raw_data) for i in scales)
    assert with_scales <= 0.16 * 4 * linear_params  # 4 bits + one float32 scale per 32


def ops_of(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48))
    config = QuantConfig(inputs=INPUTS["8da_token_affine"], params=PARAMS["w4_g32"])
    quantize_model(model, config)
    model.train()
    model(torch.randn(4, 64))
    converted = convert(model.eval())
    path = tmp_path_factory.mktemp("layer") / "layer.onnx"
    export_onnx(converted, torch.randn(2, 3, 64), path)
    return path, converted


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    offset=st.floats(-2.0, 2.0),
    outlier=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_8da4w_layer_matches_the_integer_simulation_on_any_input(
    one_layer, batch, magnitude, offset, outlier, seed
):
    """The model's input is the layer's input: onnxruntime sees the very floats torch
    quantizes, so the codes are the same and only the float scaling differs."""
    path, layer = one_layer
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, 3, 64, generator=g) + offset) * magnitude  # (a float input's
    # sequence axis is fixed: dynamic_sequence applies to token ids)
    if outlier:
        x[0, 0, 3] = 50 * magnitude
    with torch.no_grad():
        expected = layer(x).numpy()
    got = ort_run(path, x)
    row_max = np.abs(expected).max(axis=-1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=float(2e-6 * row_max.max()) + 1e-12)


def test_weights_wider_than_8_bits_are_refused_naming_the_layer(tmp_path):
    params = {"bits": 12, "granularity": "per_group", "group_size": 32}
    model = _tiny_lm(INPUTS["8da_token_affine"], params)
    converted = convert(model)
    with torch.no_grad():
        converted(torch.randint(0, 50, (2, 8)))  # the torch model runs
    with pytest.raises(ExportError, match=r"layer 'mlp.0'.*bits=12.*allowed bits <= 8"):
        export_onnx(converted, torch.randint(0, 50, (2, 8)), tmp_path / "lm.onnx")
    assert not (tmp_path / "lm.onnx").exists()


def test_a_per_group_quantizer_on_a_layer_without_a_grouped_onnx_form_is_refused(tmp_path):
    """An Embedding with ``max_norm`` renormalizes its rows at lookup: it is a fake-quant op
    after `convert`, whose per-group weight quantizer has no ONNX form."""
    model = nn.Sequential(nn.Embedding(50, 64, max_norm=1.0))
    quantize_model(model, QuantConfig(inputs=None, params=PARAMS["w4_g32"]))
    idx = torch.randint(0, 50, (2, 8))
    model.train()
    model(idx)
    converted = convert(model.eval())
    message = r"layer '0'.*param 'weight'.*granularity='per_group'.*allowed per_tensor or per_chan"
    with pytest.raises(ExportError, match=message):
        export_onnx(converted, idx, tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists()
