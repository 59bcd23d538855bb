"""torchvision's DenseNet (pre-activation BN -> ReLU -> Conv after each concat): every BatchNorm
that cannot fold is a quantized per-channel affine, from surgery through onnxruntime."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from export_helpers import optimized_op_types, ort_run, ort_session, output_lsb
from torch import nn
from torchvision.models import DenseNet

from qat_lightning import convert, export_onnx
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantBatchNorm2d
from qat_lightning.surgery import calibrate


def _densenet(growth_rate: int = 8, init: int = 16, bn_size: int = 2) -> nn.Module:
    return DenseNet(
        growth_rate=growth_rate,
        block_config=(2, 2),
        num_init_features=init,
        bn_size=bn_size,
        num_classes=10,
    )


def _optimized_graph(path, tmp_path) -> onnx.GraphProto:
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized)
    return onnx.load(str(optimized)).graph


@pytest.mark.slow
def test_densenet_batchnorms_run_as_integer_affines_in_onnxruntime(tmp_path) -> None:
    torch.manual_seed(0)
    model = _densenet()
    float_model = _densenet()
    float_model.load_state_dict(model.state_dict())
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    report = calibrate(model, [torch.randn(32, 3, 32, 32) for _ in range(4)])

    # every BatchNorm is folded into its conv or quantized as an affine: none stays float
    rows = {row.name: row for row in report.rows}
    standalone = [n for n in bns if isinstance(model.get_submodule(n), QuantBatchNorm2d)]
    assert len(standalone) == 6  # norm0 and each layer's norm2 fold into the conv before
    assert "features.denseblock1.denselayer1.norm1" in standalone
    assert "features.norm5" in standalone and "features.transition1.norm" in standalone
    for name in bns:
        expected = "quantized" if name in standalone else "fused"
        assert rows[name].status == expected, (name, rows[name])

    # a train step: batch statistics, running statistics updated, gradients to gamma and beta
    model.train()
    norm = model.features.transition1.norm
    before = norm.running_mean.clone()
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean().backward()
    assert not torch.equal(norm.running_mean, before)
    for name in standalone:
        bn = model.get_submodule(name)
        assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0, name
    model.zero_grad()

    model.eval()
    x = torch.randn(64, 3, 32, 32)
    converted = convert(model)
    for name in standalone:
        layer = converted.get_submodule(name)
        assert isinstance(layer, IntegerLayer) and layer.family is QuantBatchNorm2d, name
    with torch.no_grad():
        integer, expected = model(x), converted(x)
    assert torch.equal(integer, expected)

    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "densenet.onnx")
    top1 = float((ort_run(path, x).argmax(1) == expected.numpy().argmax(1)).mean())
    assert top1 >= 0.99, top1

    # in onnxruntime each BN is a depthwise 1x1 QLinearConv; no float BN, Add or per-channel Mul
    graph = _optimized_graph(path, tmp_path)
    ops = [node.op_type for node in graph.node]
    assert "BatchNormalization" not in ops and "Add" not in ops, ops
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    per_channel_mul = [
        n.name
        for n in graph.node
        if n.op_type == "Mul"
        and any(len(shapes.get(i, ())) and max(shapes[i]) > 1 for i in n.input)
    ]
    assert not per_channel_mul, per_channel_mul
    depthwise = [
        n
        for n in graph.node
        if n.op_type == "QLinearConv"
        and any(a.name == "group" and a.i > 1 for a in n.attribute)
        and shapes.get(n.input[3], (0, 0, 0, 0))[2:] == (1, 1)
    ]
    assert len(depthwise) == len(standalone), [n.name for n in depthwise]
    assert "Conv" not in ops, ops  # every conv, the BNs' included, runs in integers


@pytest.mark.slow
def test_densenet_int8_onnx_is_at_most_30_percent_of_fp32(tmp_path) -> None:
    """At growth rate 32 (210k parameters; the 9.5k of growth rate 8 are too few: per-channel
    scales, int32 biases and graph nodes make up a third of either file there)."""
    torch.manual_seed(0)
    model = _densenet(growth_rate=32, init=64, bn_size=4)
    float_model = _densenet(growth_rate=32, init=64, bn_size=4)
    float_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [torch.randn(8, 3, 32, 32)])
    assert sum(isinstance(m, QuantBatchNorm2d) for m in model.modules()) == 6
    path = export_onnx(model.eval(), x, tmp_path / "densenet.onnx")
    fp32_path = tmp_path / "fp32.onnx"
    torch.onnx.export(float_model.eval(), (x,), str(fp32_path), external_data=False)
    assert os.path.getsize(path) <= 0.30 * os.path.getsize(fp32_path)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)), (64, 6)),
        (nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 4, 1)), (64, 6, 5)),
        (nn.Sequential(nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 4, 1)), (16, 3, 2, 3, 3)),
    ],
)
def test_batchnorm1d_and_3d_run_as_qlinearconv_equal_to_convert(model, shape, tmp_path) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(*shape) for _ in range(3)]
    calibrate(model, batches, inputs={"observer": "minmax"})
    model.eval()
    converted = convert(model)
    expected = converted(batches[0]).detach().numpy()
    path = export_onnx(model, batches[0][:2], tmp_path / "bn.onnx")
    # one output step at most (an integer runtime's own rare rounding differences)
    assert abs(ort_run(path, batches[0]) - expected).max() <= output_lsb(converted) * 1.001
    ops = optimized_op_types(path, tmp_path)
    assert ops["QLinearConv"] >= 1 and ops["BatchNormalization"] + ops["Conv"] == 0, ops
