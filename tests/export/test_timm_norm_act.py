"""timm's BatchNormAct2d (a BatchNorm2d carrying its activation), in timm models from small
configs with random init: after a conv it folds into it (with its ReLU); with no conv before
it (timm's DenseNet pre-activation) it is the per-channel integer affine and its activation;
onnxruntime runs every conv, the affines included, as QLinearConv."""

from __future__ import annotations

import pytest
import torch
from export_helpers import optimized_op_types, ort_run
from torch import nn

from qat_lightning import convert, export_onnx
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantBatchNorm2d, QuantConvBn2d, QuantConvBnReLU2d
from qat_lightning.surgery import calibrate, quantize_model
from qat_lightning.surgery.norm_act import BatchNormAct

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, ConvNormAct  # noqa: E402
from timm.models.densenet import DenseNet  # noqa: E402


def _densenet() -> nn.Module:
    return DenseNet(growth_rate=8, block_config=(2, 2), num_classes=10)


@pytest.mark.slow
def test_timm_densenet_norm_acts_fold_or_become_integer_affines(tmp_path) -> None:
    torch.manual_seed(0)
    model = _densenet()
    norm_acts = [n for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)]
    assert len(norm_acts) == 11
    report = calibrate(model, [torch.randn(16, 3, 32, 32) for _ in range(4)])
    rows = {row.name: row for row in report.rows}
    assert not any(isinstance(m, BatchNormAct2d) for m in model.modules())
    folded = [n for n in norm_acts if rows[f"{n}.bn"].status == "fused"]
    affine = [n for n in norm_acts if isinstance(model.get_submodule(f"{n}.bn"), QuantBatchNorm2d)]
    # the stem's norm0 and each dense layer's norm2 follow a conv: folded with their ReLU
    assert sorted(folded) == sorted(n for n in norm_acts if n.endswith(("norm0", "norm2")))
    assert sorted(affine) == sorted(set(norm_acts) - set(folded))  # pre-activation ones
    for name in folded:
        assert rows[f"{name}.act"].status == "fused", rows[f"{name}.act"]
        assert report.renamed[name].endswith(".bn") and report.renamed[name] != f"{name}.bn"
    for name in affine:
        assert rows[f"{name}.act"].status == "quantized" and report.renamed[name] == f"{name}.bn"
    assert isinstance(model.features.conv0, QuantConvBnReLU2d)

    # a train step: batch statistics update the running ones, gradients reach gamma and beta
    model.train()
    norm = model.features.transition1.norm.bn
    before = norm.running_mean.clone()
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean().backward()
    assert not torch.equal(norm.running_mean, before)
    for name in affine:
        bn = model.get_submodule(f"{name}.bn")
        assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0, name
    model.zero_grad()

    model.eval()
    x = torch.randn(64, 3, 32, 32)
    converted = convert(model)
    for name in affine:
        layer = converted.get_submodule(f"{name}.bn")
        assert isinstance(layer, IntegerLayer) and layer.family is QuantBatchNorm2d, name
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(model(x), expected)

    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "densenet.onnx")
    top1 = float((ort_run(path, x).argmax(1) == expected.numpy().argmax(1)).mean())
    assert top1 >= 0.99, top1
    ops = optimized_op_types(path, tmp_path)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == 0, ops
    # every conv and every pre-activation affine (a depthwise 1x1 conv) is a QLinearConv
    convs = sum(isinstance(m, nn.Conv2d) for m in converted.modules())
    assert ops["QLinearConv"] >= len(affine) + 5, (ops, convs)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_timm_conv_norm_act_folds_with_its_activation(act, tmp_path) -> None:
    """timm's ConvNormAct (conv -> BatchNormAct2d): the BatchNorm folds into the conv; a ReLU
    fuses too, another activation (SiLU) follows the folded conv as its quantized module."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ConvNormAct(3, 8, 3, act_layer=act),
        ConvNormAct(8, 8, 3, stride=2, act_layer=act),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for module in model.modules():  # running statistics a trained model would have
        if isinstance(module, BatchNormAct2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    calibrate(model, [torch.randn(16, 3, 16, 16) for _ in range(3)])
    fused = QuantConvBnReLU2d if act is nn.ReLU else QuantConvBn2d
    for block in (model[0], model[1]):
        assert isinstance(block.bn, BatchNormAct) and isinstance(block.conv, fused)
    converted = convert(model)
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(model(x), expected)
    assert (expected.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    path = export_onnx(model, x[:2], tmp_path / "convnormact.onnx")
    assert (ort_run(path, x).argmax(1) == expected.numpy().argmax(1)).mean() >= 0.99
    ops = optimized_op_types(path, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["BatchNormalization"] + ops["Conv"] == 0, ops


def test_a_skipped_norm_act_stays_float_and_unsplit() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Flatten())
    report = quantize_model(model, skip=["1"])
    assert type(model[1]) is BatchNormAct2d
    rows = {r.name: r.status for r in report.rows}
    assert rows["1"] == "float" and rows["1.act"] == "skipped", rows


def test_a_norm_act_after_a_skipped_conv_is_the_integer_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Flatten())
    report = quantize_model(model, skip=["0"])
    assert isinstance(model[1].bn, QuantBatchNorm2d)
    assert {r.name: r.status for r in report.rows}["1.bn"] == "quantized"
