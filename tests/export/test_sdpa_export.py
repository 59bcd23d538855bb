"""Surgery rewrites a traced ``F.scaled_dot_product_attention`` into
`QuantScaledDotProductAttention`, the rewrite checks clean against the block's own forward,
integer eval is `convert` bit for bit, and onnxruntime runs both attention matmuls as integer
kernels."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from export_helpers import optimized_op_types
from torch import nn

from qat_lightning import convert, export_onnx, quantize_model
from qat_lightning.nn import QuantMatMul, QuantScaledDotProductAttention, ScaledDotProductAttention
from qat_lightning.surgery.calibrate import compute_encodings
from qat_lightning.surgery.rewrite_check import pending_checks

U8 = {"bits": 8, "symmetric": False, "signed": False}


class SelfAttention(nn.Module):
    """A user's attention block: projections, then the functional SDPA (causal)."""

    def __init__(self, e: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(e, 3 * e)
        self.out = nn.Linear(e, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, e = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
        return self.out(y.transpose(1, 2).reshape(n, length, e))


def test_surgery_rewrites_the_function_checks_clean_and_exports_integer_matmuls(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(SelfAttention(), SelfAttention())
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        expected = model(x)
    report = quantize_model(model)
    assert report.rewritten == ["0", "1"]
    for name in ("0.sdpa", "1.sdpa"):
        row = report.row(name)
        assert (row.status, row.after) == ("quantized", "QuantScaledDotProductAttention")
        assert row.before == "scaled_dot_product_attention()"
    assert isinstance(model[0].sdpa.qk, QuantMatMul)
    # Each activation is quantized once: q, k, v by the qkv projection, the attention output
    # by p·v (the probabilities, made inside, keep their own unsigned quantizer).
    for block in model:
        assert block.sdpa.input_quantizers == [None, None, None]
        assert block.sdpa.pv.input_quantizers[0] is not None
        assert block.out.input_quantizers[0] is None
        assert block.out.input_encoding(0) is block.sdpa.pv.output_quantizers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the rewrite computes what the block did
        compute_encodings(model, [x] + [torch.randn(3, 6, 16) for _ in range(3)])
    assert not pending_checks(model) and not report.warnings, report.warnings
    model.eval()
    with torch.no_grad():
        integer = model(x)
    assert (integer - expected).norm() < 0.1 * expected.norm()
    with torch.no_grad():
        assert torch.equal(convert(model)(x), integer)
    path = export_onnx(model, x, tmp_path / "attention.onnx")
    ops = optimized_op_types(path, tmp_path)
    assert ops["QLinearMatMul"] >= 4, ops  # q·kᵀ and p·v of both blocks
    assert ops["MatMul"] + ops["FusedMatMul"] + ops["Gemm"] == 0, ops
    assert QuantScaledDotProductAttention(U8).to_float().__class__ is ScaledDotProductAttention
