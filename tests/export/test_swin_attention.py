"""Acceptance: torchvision's ``SwinTransformer`` (``swin_t``'s layout, small config, random
init) quantizes every projection and both attention matmuls of its shifted-window attention
at W8A8: calibration, a train step reaching every weight, integer eval, `convert` bit for bit,
ONNX in onnxruntime with integer kernels only (no float MatMul/FusedMatMul/Gemm), top-1
agreement and the int8 file size against fp32. The relative-position-bias table and the shift
mask stay float, and say so; Swin V2's position-bias MLP stays float and `convert` folds it
to the bias it computes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from export_helpers import agreement, optimized_op_types, ort_run, output_lsb
from torch import nn

from qat_lightning import convert, export_onnx
from qat_lightning.export.report import layer_report
from qat_lightning.nn import QuantModule
from qat_lightning.nn.swin_attention import QuantShiftedWindowAttentionMixin
from qat_lightning.surgery import calibrate

swin = pytest.importorskip("torchvision.models.swin_transformer")

SHAPE = (3, 32, 32)


def _swin(v2: bool = False) -> nn.Module:
    blocks = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    return swin.SwinTransformer(  # swin_t's layout (patch 4, window 7 -> 4 at 32 px), narrower
        **(blocks if v2 else {}),
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[4, 4],
        num_classes=10,
    )


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_goes_w8a8_from_surgery_to_onnxruntime(v2, tmp_path) -> None:
    torch.manual_seed(0)
    model = _swin(v2)
    float_model = copy.deepcopy(model).eval()
    report = calibrate(model, [torch.randn(8, *SHAPE) for _ in range(6)])
    attention = [m for m in model.modules() if isinstance(m, QuantShiftedWindowAttentionMixin)]
    assert len(attention) == 4  # shift 0 and shift 2 blocks in both stages
    assert {tuple(a.shift_size) for a in attention} == {(0, 0), (2, 2)}
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    position_mlps = [n for n in linears if ".cpb_mlp." in n]  # V2's bias MLP: float, folded
    assert linears == position_mlps, linears  # every other Linear, qkv and proj, is quantized
    assert len(position_mlps) == (8 if v2 else 0)
    assert not [r for r in report.rows if "read outside" in r.note]

    model.train()  # a QAT step reaches every weight, the float bias tables too
    nn.functional.cross_entropy(
        model(torch.randn(8, *SHAPE)), torch.randint(0, 10, (8,))
    ).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()

    model.eval()
    x = torch.randn(200, *SHAPE)
    calls = []
    hooks = [a.qk.register_forward_hook(lambda *args: calls.append(1)) for a in attention]
    converted = convert(model)
    with torch.no_grad():
        integer, expected, reference = model(x), converted(x), float_model(x)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 4, "the quantized attention matmul was bypassed in eval"
    assert torch.equal(integer, expected)  # integer eval is the converted model, bit for bit
    assert not torch.equal(integer, reference)
    assert (integer - reference).norm() < 0.3 * reference.norm()
    rows = layer_report(converted)["layers"]
    floats = {r["name"]: r for r in rows if r["status"] != "integer" and ".attn" in r["name"]}
    assert set(floats) == set(_attention_names(model))  # the container's own parameter ...
    if v2:  # ... logit_scale; the position bias a float buffer, its MLP gone
        assert all(r["params"] == attention[0].logit_scale.numel() for r in floats.values())
        assert all("cpb_mlp" not in n for n, _ in converted.named_modules())
        biases = [m.position_bias for m in converted.modules() if hasattr(m, "position_bias")]
        assert len(biases) == 4 and all(b.dtype == torch.float32 for b in biases)
    else:  # ... the relative position bias table
        table = attention[0].relative_position_bias_table.numel()
        assert all(r["params"] == table for r in floats.values())

    path = export_onnx(model, torch.randn(2, *SHAPE), tmp_path / "int8.onnx")
    within, top1 = agreement(ort_run(path, x), expected.numpy(), output_lsb(converted))
    assert top1 >= 0.99, (within, top1)
    ops = optimized_op_types(path, tmp_path)
    macs = len([m for m in model.modules() if isinstance(m, QuantModule) and hasattr(m, "weight")])
    assert macs == 4 * 4 + 1 + 1 + 1  # qkv, proj, 2 MLP per block; merging; head; patch conv
    integer_macs = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"]
    assert integer_macs + ops["MatMulInteger"] >= macs - 1 + 2 * 4, ops  # (patch conv apart)
    assert ops["QLinearMatMul"] >= 2 * 4, ops  # q·kᵀ and p·v of every attention
    assert ops["MatMul"] + ops["FusedMatMul"] + ops["Gemm"] == 0, ops  # no float matmul left

    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(float_model, (torch.randn(2, *SHAPE),), str(fp32_path), external_data=False)
    assert os.path.getsize(path) <= 0.30 * os.path.getsize(fp32_path)


def _attention_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantShiftedWindowAttentionMixin)]


def test_padded_windows_convert_bit_for_bit() -> None:
    """A map that is not a multiple of the window (padding, and no shift along a side the
    window covers) in integer eval is `convert`'s integer model."""
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)
    model = nn.Sequential(nn.Linear(16, 16), attn, nn.Linear(16, 4))
    calibrate(model, [torch.randn(4, 6, 3, 16) for _ in range(3)])
    assert isinstance(model[1], QuantShiftedWindowAttentionMixin)
    model.eval()
    x = torch.randn(8, 6, 3, 16)
    with torch.no_grad():
        assert torch.equal(model(x), convert(model)(x))
