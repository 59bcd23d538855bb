"""A layer family defined outside the package (here, in this file) goes through surgery,
calibration, QAT, integer eval, `convert` and ONNX with no edit to qat_lightning: the layer
protocol (`QuantMAC`: ``mac_op``, ``weight_and_bias``, ``mac_output_axis``) is all it needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from export_helpers import agreement, optimized_op_types, ort_run, output_lsb
from torch import nn

from qat_lightning import convert, export_onnx, quantize_model, register_quant_module
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantMAC
from qat_lightning.surgery import calibrate


class ScaledLinear(nn.Module):
    """A user's linear layer whose weight is scaled per output row by a fixed gain buffer."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)
        self.register_buffer("gain", torch.rand(out_features) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain[:, None], self.bias)


class ChannelMix(nn.Module):
    """A user's 1x1 channel mixing of ``(N, C, L)`` written as an einsum, with its own weight."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels) / in_channels**0.5)
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,nil->nol", self.weight, x) + self.bias[:, None]


@register_quant_module(ScaledLinear)
class QuantScaledLinear(QuantMAC, ScaledLinear):
    """The integer model computes with ``weight * gain``: that is the weight to quantize."""

    mac_output_axis = -1
    mac_float32_exact = True  # F.linear: a GEMM

    def weight_and_bias(self):
        return self.weight * self.gain[:, None], self.bias

    @staticmethod
    def mac_op(layer, x, w, b):
        return F.linear(x, w, b)


@register_quant_module(ChannelMix)
class QuantChannelMix(QuantMAC, ChannelMix):
    mac_output_axis = 1  # channels of the input and of the accumulator: (N, C, L)

    @staticmethod
    def mac_op(layer, x, w, b):
        y = torch.einsum("oi,nil->nol", w, x)
        return y if b is None else y + b[:, None]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = ChannelMix(6, 12)
        self.act = nn.ReLU()
        self.head = ScaledLinear(12 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mix(x)).flatten(1))


def _batches(n: int) -> list[torch.Tensor]:
    return [torch.randn(256, 6, 5) for _ in range(n)]


def test_a_user_layer_family_goes_from_surgery_to_onnxruntime(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    float_model = Net()
    float_model.load_state_dict(model.state_dict())
    report = calibrate(model, _batches(4), inputs={"observer": "minmax"})
    rows = {row.name: row for row in report.rows}
    assert rows["mix"].after == "QuantChannelMix" and rows["mix"].status == "quantized"
    assert rows["head"].after == "QuantScaledLinear" and rows["head"].status == "quantized"
    assert model.head.input_quantizers[0] is None  # ReLU's output quantizer owns that tensor

    # QAT: a training step reaches the user's weights through the fake quantizers
    model.train()
    loss = model(torch.randn(8, 6, 5)).square().mean()
    loss.backward()
    assert model.mix.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    model.zero_grad()

    # integer eval is the converted model, bit for bit, and close to the float model
    model.eval()
    x = torch.randn(64, 6, 5)
    converted = convert(model)
    assert isinstance(converted.mix, IntegerLayer) and converted.mix.family is QuantChannelMix
    assert isinstance(converted.head, IntegerLayer)
    with torch.no_grad():
        integer, expected, reference = model(x), converted(x), float_model(x)
    assert torch.equal(integer, expected)
    lsb = output_lsb(converted)
    assert (integer - reference).norm() < 0.1 * reference.norm()  # 8 bits: SQNR > 20 dB

    # the integer weight of the scaled layer is weight * gain, quantized
    codes = converted.head.weight_qtensor().dequantize()
    folded = (model.head.weight * model.head.gain[:, None]).detach()
    assert (codes - folded).abs().max() <= converted.head.weight_scale.max() / 2 + 1e-6

    path = export_onnx(model, torch.randn(2, 6, 5), tmp_path / "user.onnx")
    within, top1 = agreement(ort_run(path, x), expected.numpy(), lsb)
    assert within >= 0.99 and top1 >= 0.98, (within, top1)
    ops = optimized_op_types(path, tmp_path)
    assert ops["QGemm"] + ops["QLinearMatMul"] >= 1, ops  # the scaled linear runs in integers


def test_to_float_gives_back_the_users_module_with_its_parameters() -> None:
    model = Net()
    weight = model.head.weight
    quantize_model(model)
    back = model.head.to_float()
    assert type(back) is ScaledLinear and back.weight is weight
    assert torch.equal(back.gain, model.head.gain)
