"""How the export stores MAC layers for onnxruntime's integer kernels: a Linear on token
sequences as one ``QGemm`` with its int32 bias, and 8-bit weights as uint8 (``weights="exact"``,
exact on every x86 CPU) or int8 (``weights="int8"``, the faster u8 x s8 kernels)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from export_helpers import calibrate, optimized_op_types, ort_run, small_cnn
from test_export_onnx import UINT8, _initializer_types
from torch import nn

from qat_lightning.export import convert, export_onnx
from qat_lightning.surgery import quantize_model


def test_a_linear_on_token_sequences_runs_as_qgemm_and_is_exact(tmp_path) -> None:
    # (batch, tokens, features) with a dynamic batch: exported as a 2-D Gemm
    # with its int32 bias, onnxruntime fuses one QGemm per Linear (int32 accumulator + bias,
    # one requantization, as the integer model). A 3-D MatMul + Add became a float-output
    # MatMulIntegerToFloat and a float bias Add, one step off the integer model at times.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 16))
    quantize_model(model)
    calibrate(model, [torch.randn(8, 12, 48) * 2 for _ in range(2)])
    path = export_onnx(model, torch.randn(2, 12, 48), tmp_path / "m.onnx")
    ops = optimized_op_types(path, tmp_path)
    assert ops["QGemm"] == 2 and ops["MatMulIntegerToFloat"] == 0, ops
    x = torch.randn(5, 12, 48, generator=torch.Generator().manual_seed(1)) * 2  # other batch
    with torch.no_grad():
        expected = convert(model)(x).numpy()
    np.testing.assert_array_equal(ort_run(path, x), expected)


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def test_int8_weights_are_signed_initializers_and_the_file_says_so(tmp_path) -> None:
    model = small_cnn(width=32)  # per-channel min/max: codes up to 127, stored uint8 by default
    exact = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "exact.onnx")
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", weights="int8")
    exact_types, types = _initializer_types(exact), _initializer_types(path)
    assert {v for k, v in exact_types.items() if k.endswith(".weight")} == {UINT8}
    assert {v for k, v in types.items() if k.endswith(".weight")} == {onnx.TensorProto.INT8}
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["qat_lightning.weights"]) == "int8"
    ops = optimized_op_types(path, tmp_path)
    assert ops["QLinearConv"] >= 2 and ops["Conv"] == 0, ops
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no VNNI: onnxruntime's u8 x s8 kernels are not exact here")
    x = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        expected = convert(model)(x).numpy()
    np.testing.assert_array_equal(ort_run(path, x), expected)


def test_an_unknown_weights_form_is_refused_naming_the_allowed_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"export_onnx\(weights='uint4'\) is invalid: allowed "):
        export_onnx(small_cnn(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", weights="uint4")
    assert not (tmp_path / "m.onnx").exists()
