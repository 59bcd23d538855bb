"""QuantBatchNorm1d/2d/3d: a BatchNorm that does not fold is BN in training and a per-channel
integer affine in eval, equal to `convert`'s layer bit for bit; BNs that fold still fold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import convert, quantize_model
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantBatchNorm1d, QuantBatchNorm2d, QuantBatchNorm3d
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import calibrate


def _float_and_quant(bn: nn.BatchNorm2d) -> tuple[nn.Module, nn.Module]:
    """A float BN and its quantize_model twin (same initial state), quantizers switched off."""
    twin = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine)
    twin.load_state_dict(bn.state_dict())
    model = nn.Sequential(twin)
    quantize_model(model)
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.enable_fake_quant(False).enable_observer(False)
    return bn, model


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 6),
    hw=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    affine=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    eps=st.sampled_from([1e-5, 1e-3]),
    shift=st.floats(-3, 3),
    spread=st.floats(0.1, 4),
    seed=st.integers(0, 2**16),
)
def test_with_quantization_off_it_is_batchnorm_in_train_and_eval(
    n, c, hw, affine, momentum, eps, shift, spread, seed
) -> None:
    torch.manual_seed(seed)
    bn, model = _float_and_quant(nn.BatchNorm2d(c, eps=eps, momentum=momentum, affine=affine))
    qbn = model[0]
    assert isinstance(qbn, QuantBatchNorm2d) and isinstance(qbn, nn.BatchNorm2d)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(-2, 2), bn.bias.uniform_(-1, 1)
            qbn.weight.copy_(bn.weight), qbn.bias.copy_(bn.bias)
    for _ in range(3):  # train: batch statistics, running statistics updated alike
        x = torch.randn(n, c, *hw) * spread + shift
        x.requires_grad_(True)
        expected, got = bn.train()(x), model.train()(x)
        assert torch.equal(got, expected)
        torch.testing.assert_close(
            torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0]
        )
    assert torch.equal(qbn.running_mean, bn.running_mean)
    assert torch.equal(qbn.running_var, bn.running_var)
    assert torch.equal(qbn.num_batches_tracked, bn.num_batches_tracked)
    x = torch.randn(n, c, *hw) * spread + shift  # eval: x * a + b from the running statistics
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-5)


def _calibrated(bn: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(-2, 2), bn.bias.uniform_(-1, 1)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    model = nn.Sequential(bn, nn.ReLU())
    calibrate(model, batches, inputs={"observer": "minmax"})  # every batch within range
    return model.eval()


@pytest.mark.parametrize(
    ("bn", "shape", "family"),
    [
        (nn.BatchNorm1d(6), (32, 6), QuantBatchNorm1d),
        (nn.BatchNorm1d(6, affine=False), (32, 6, 7), QuantBatchNorm1d),
        (nn.BatchNorm2d(5), (16, 5, 4, 4), QuantBatchNorm2d),
        (nn.BatchNorm3d(3), (8, 3, 2, 3, 3), QuantBatchNorm3d),
    ],
)
def test_integer_eval_is_the_converted_affine_bit_for_bit(bn, shape, family) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(*shape) * 2 for _ in range(3)]
    model = _calibrated(bn, batches)
    assert type(model[0]) is family
    float_bn = nn.Sequential(family.to_float(model[0]), nn.ReLU()).eval()
    converted = convert(model)
    assert isinstance(converted[0], IntegerLayer) and converted[0].family is family
    assert converted[0].weight_codes.dtype == torch.int8
    assert converted[0].bias_codes.dtype == torch.int32
    x = batches[1]  # within the calibrated input range
    with torch.no_grad():
        integer, expected, reference = model(x), converted(x), float_bn(x)
    assert torch.equal(integer, expected)
    # half an input step times |a|, half an output step, the bias's rounding: one of each
    bn = float_bn[0]
    a = torch.rsqrt(bn.running_var + bn.eps) * (1 if bn.weight is None else bn.weight.abs())
    s_in = converted[0].input_encoding(0).scale
    s_out = converted[0].output_quantizers[0].scale
    assert (integer - reference).abs().max() <= a.max() * s_in + s_out


def test_a_batchnorm_after_a_conv_still_folds_and_one_after_the_input_does_not() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    report = quantize_model(model)
    rows = {row.name: row for row in report.rows}
    assert rows["0"].after == "QuantBatchNorm2d" and rows["0"].status == "quantized"
    assert rows["1"].status == "fused" and rows["2"].after == "Identity"
    assert type(model[1]).__name__ == "QuantConvBnReLU2d"


def test_batchnorm_without_running_statistics_stays_float_with_the_reason() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Conv2d(3, 4, 1))
    report = quantize_model(model)
    row = next(row for row in report.rows if row.name == "0")
    assert row.status == "float" and "track_running_stats=False" in row.note
    assert type(model[0]) is nn.BatchNorm2d


def test_with_fuse_false_a_batchnorm_after_a_conv_is_an_integer_affine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    report = calibrate(model, batches, fuse=False)
    assert report.row("1").status == "quantized" and type(model[1]) is QuantBatchNorm2d
    model.eval()
    converted = convert(model)
    assert isinstance(converted[1], IntegerLayer)
    with torch.no_grad():
        assert torch.equal(model(batches[0]), converted(batches[0]))
