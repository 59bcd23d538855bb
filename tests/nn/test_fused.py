"""Fused Conv/Linear + BatchNorm (+ReLU): QAT fold simulation, freezing, exact folding, export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.nn import (
    QuantConv2d,
    QuantConvBn1d,
    QuantConvBn2d,
    QuantConvBn3d,
    QuantConvBnReLU1d,
    QuantConvBnReLU2d,
    QuantConvBnReLU3d,
    QuantLinearBn1d,
    fake_quant_eval,
)
from qat_lightning.nn.fused import fused_bn_type
from qat_lightning.nn.integer import quantize_bias
from qat_lightning.quant import QuantScheme

ACT = QuantScheme(bits=8, symmetric=False)
WEIGHT = QuantScheme(bits=8, granularity="per_channel")


def _conv(conv_type, channels_in, channels_out):
    return lambda bias: conv_type(channels_in, channels_out, 3, padding=1, bias=bias)


_1D = (_conv(nn.Conv1d, 3, 6), nn.BatchNorm1d, (3, 10))
_2D = (_conv(nn.Conv2d, 3, 6), nn.BatchNorm2d, (3, 6, 6))
_3D = (_conv(nn.Conv3d, 2, 4), nn.BatchNorm3d, (2, 4, 4, 4))
# class -> (layer factory taking `bias`, bn type, input shape without batch)
CASES = {
    QuantConvBn1d: _1D,
    QuantConvBnReLU1d: _1D,
    QuantConvBn2d: _2D,
    QuantConvBnReLU2d: _2D,
    QuantConvBn3d: _3D,
    QuantConvBnReLU3d: _3D,
    QuantLinearBn1d: (lambda bias: nn.Linear(12, 10, bias=bias), nn.BatchNorm1d, (12,)),
}
ALL = list(CASES)


def float_pair(cls, bias=True, seed=0, **bn_kwargs):
    """A float layer and a BatchNorm with non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    make_layer, make_bn, shape = CASES[cls]
    layer = make_layer(bias)
    bn = make_bn(layer.weight.shape[0], **bn_kwargs)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return layer, bn, shape


def fused(cls, bias=True, seed=0, params=WEIGHT, **bn_kwargs):
    layer, bn, shape = float_pair(cls, bias, seed, **bn_kwargs)
    return cls.from_modules(layer, bn, ACT, params), shape


def float_reference(module) -> nn.Sequential:
    """An independent float copy of the fused module's layer, BN and ReLU."""
    layer = copy.deepcopy(module.to_float())
    return layer if isinstance(layer, nn.Sequential) else nn.Sequential(layer)


def calibrate(module, shape, seed=1, batches=2):
    torch.manual_seed(seed)
    module.train()
    for _ in range(batches):  # move the running statistics away from their initial values
        module(torch.randn(32, *shape))
    module.eval()
    with module.compute_encodings():
        module(torch.randn(64, *shape))


def disable_fake_quant(module):
    for quantizer in module.quantizers():
        quantizer.enable_fake_quant(False).enable_observer(False)


def pool(y: torch.Tensor) -> torch.Tensor:
    """Per-class scores: global average pooling over any spatial dims."""
    return y.flatten(2).mean(-1) if y.dim() > 2 else y


# -- against the float model --------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    cls=st.sampled_from(ALL),
    bias=st.booleans(),
    affine=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, None]),
    seed=st.integers(0, 1000),
)
def test_matches_float_conv_bn_without_fake_quant(cls, bias, affine, momentum, seed):
    module, shape = fused(cls, bias, seed, affine=affine, momentum=momentum)
    reference = float_reference(module)
    disable_fake_quant(module)
    module.train()
    reference.train()
    for step in range(3):
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed + step))
        torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=1e-5)
    bn, ref_bn = module.bn, reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, atol=1e-6, rtol=1e-5)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 3
    module.eval()
    reference.eval()
    x = torch.randn(8, *shape)
    torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_relu", [False, True])
def test_qat_train_forward_matches_torch_ao(with_relu):
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
    )

    cls = QuantConvBnReLU2d if with_relu else QuantConvBn2d
    module, shape = fused(cls)
    calibrate(module, shape)
    disable_fake_quant(module)  # activations: torch.ao's are outside its ConvBn2d
    module.param_quantizers["weight"].enable_fake_quant(True)
    qconfig = QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
        weight=FakeQuantize.with_args(
            observer=PerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        ),
    )
    layer, bn = copy.deepcopy(module.to_float()[:2])
    float_fused = nni.ConvBnReLU2d(layer, bn, nn.ReLU()) if with_relu else nni.ConvBn2d(layer, bn)
    float_fused.qconfig = qconfig
    oracle = (nniqat.ConvBnReLU2d if with_relu else nniqat.ConvBn2d).from_float(float_fused)
    scale, zero_point = module.param_quantizers["weight"].encoding()
    oracle.weight_fake_quant.scale = scale.clone()
    oracle.weight_fake_quant.zero_point = zero_point.clone()
    oracle.weight_fake_quant.disable_observer()
    module.train()
    oracle.train()
    torch.manual_seed(5)
    for _ in range(3):
        x = torch.randn(16, *shape)
        y, y_oracle = module(x), oracle(x)
        torch.testing.assert_close(y, y_oracle, atol=1e-6, rtol=1e-5)
        y.square().mean().backward()
        y_oracle.square().mean().backward()
    torch.testing.assert_close(module.weight.grad, oracle.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(module.bn.weight.grad, oracle.bn.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(module.bn.running_var, oracle.bn.running_var)
    torch.testing.assert_close(module.bn.running_mean, oracle.bn.running_mean)


# -- freezing -------------------------------------------------------------------------------------
def test_frozen_stats_stay_put_in_training_and_survive_state_dict():
    module, shape = fused(QuantConvBn2d)
    calibrate(module, shape)
    module.freeze_bn_stats()
    module.train()
    stats = {k: v.clone() for k, v in module.bn.state_dict().items()}
    x = torch.randn(8, *shape)
    y_train = module(x)
    module(torch.randn(8, *shape) * 3 + 1)
    for name, value in module.bn.state_dict().items():
        assert torch.equal(value, stats[name]), name
    # Frozen training computes exactly what eval (and export) computes.
    assert torch.equal(y_train, module.eval()(x))

    restored, _ = fused(QuantConvBn2d, seed=7)
    restored.load_state_dict(module.state_dict())
    assert int(restored.bn_frozen) == 1
    restored.train()
    restored(torch.randn(8, *shape) * 3 + 1)
    for name, value in restored.bn.state_dict().items():
        assert torch.equal(value, stats[name]), name

    module.freeze_bn_stats(False).train()
    module(torch.randn(8, *shape) * 3 + 1)
    assert not torch.equal(module.bn.running_mean, stats["running_mean"])


def test_bn_in_eval_while_layer_trains_starts_frozen():
    layer, bn, _ = float_pair(QuantConvBn2d)
    layer.train()
    bn.eval()
    assert int(QuantConvBn2d.from_modules(layer, bn, ACT, WEIGHT).bn_frozen) == 1


# -- integer mode ---------------------------------------------------------------------------------
def integer_and_fake_quant(cls, bits):
    layer, bn, shape = float_pair(cls)
    module = cls.from_modules(layer, bn, ACT.replace(bits=bits), WEIGHT.replace(bits=bits))
    calibrate(module, shape)
    x = torch.randn(256, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fake_quant_eval():
        expected = module.output_quantizers[0].quantize(module(x))
        got = module.quantized_forward(module.input_quantizers[0].quantize(x))
    return module, x, expected, got


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_quantized_forward_agrees_with_forward(cls, bits):
    _, _, expected, got = integer_and_fake_quant(cls, bits)
    close = (got.codes.int() - expected.codes.int()).abs() <= 1
    assert close.float().mean() >= 0.99
    agree = pool(expected.dequantize()).argmax(1) == pool(got.dequantize()).argmax(1)
    assert agree.float().mean() >= 0.995
    if cls._relu:
        assert (got.dequantize() >= 0).all()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_eval_forward_is_the_integer_simulation(cls):
    module, x, _, got = integer_and_fake_quant(cls, 4)
    with torch.no_grad():
        assert torch.equal(module(x), got.dequantize())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_quantized_forward_is_the_folded_layer_with_an_int32_bias(cls):
    module, x, _, got = integer_and_fake_quant(cls, 4)
    weight, bias = module.weight_and_bias()
    acc_scale = (
        module.input_quantizers[0].encoding()[0] * module.param_quantizers["weight"].encoding()[0]
    )
    with torch.no_grad():
        int32_bias = (quantize_bias(bias, acc_scale) * acc_scale).float()
        y = module._mac(
            module.input_quantizers[0](x), module.fq_param("weight", weight), int32_bias
        )
        y = torch.relu(y) if cls._relu else y
    assert torch.equal(got.codes, module.output_quantizers[0].quantize(y).codes)


# -- folding --------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    cls=st.sampled_from(ALL),
    bias=st.booleans(),
    affine=st.booleans(),
    negative_gamma=st.booleans(),
    bits=st.sampled_from([4, 8]),
)
def test_fold_bn_is_exact(cls, bias, affine, negative_gamma, bits):
    layer, bn, shape = float_pair(cls, bias, affine=affine)
    if negative_gamma and affine:
        with torch.no_grad():
            bn.weight[::2].neg_()
    module = cls.from_modules(layer, bn, ACT.replace(bits=bits), WEIGHT.replace(bits=bits))
    calibrate(module, shape)
    x = torch.randn(32, *shape)
    with torch.no_grad():
        before = module(x)
        codes_before = module.quantized_forward(module.input_quantizers[0].quantize(x)).codes
        module.fold_bn()
        after_eval = module(x)
        codes_after = module.quantized_forward(module.input_quantizers[0].quantize(x)).codes
        stats = module.bn.running_mean.clone()
        after_train = module.train()(x)
    torch.testing.assert_close(after_eval, before, atol=1e-6, rtol=0)
    assert torch.equal(codes_after, codes_before)
    assert torch.equal(after_train, after_eval)  # BN is gone, in train mode too
    assert torch.equal(module.bn.running_mean, stats)
    assert module.weight is layer.weight


def test_folded_module_is_the_plain_quantized_conv():
    module, shape = fused(QuantConvBn2d)
    calibrate(module, shape)
    module.fold_bn()
    plain = QuantConv2d.from_float(copy.deepcopy(module.to_float()), ACT, WEIGHT)
    plain.load_state_dict(module.state_dict(), strict=False)
    assert type(module.to_float()) is nn.Conv2d
    x = torch.randn(8, *shape)
    for mode in (True, False):
        assert torch.equal(module.train(mode)(x), plain.train(mode)(x))


def test_fold_without_conv_bias_keeps_training_with_an_earlier_optimizer():
    layer, bn, shape = float_pair(QuantConvBn2d, bias=False)
    optimizer = torch.optim.SGD([*layer.parameters(), *bn.parameters()], lr=0.1)
    module = QuantConvBn2d.from_modules(layer, bn, ACT, WEIGHT)
    calibrate(module, shape)
    module.fold_bn().train()
    assert module.bias is bn.bias  # beta carries the folded bias on
    before = module.bias.detach().clone()
    module(torch.randn(8, *shape)).sum().backward()
    optimizer.step()
    assert not torch.equal(module.bias, before)


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("cls", [QuantConvBnReLU2d, QuantLinearBn1d], ids=lambda c: c.__name__)
def test_gradients_reach_weight_gamma_and_beta(cls, frozen):
    module, shape = fused(cls)
    calibrate(module, shape)
    module.freeze_bn_stats(frozen).train()
    module(torch.randn(16, *shape)).square().mean().backward()
    for param in (module.weight, module.bn.weight, module.bn.bias):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def test_shares_parameters_and_an_earlier_optimizer_trains_it():
    layer, bn, shape = float_pair(QuantConvBnReLU2d)
    optimizer = torch.optim.Adam([*layer.parameters(), *bn.parameters()], lr=1e-2)
    module = QuantConvBn2d.from_modules(layer, bn, ACT, WEIGHT, relu=True)
    assert type(module) is QuantConvBnReLU2d and isinstance(module, nn.Conv2d)
    assert module.weight is layer.weight and module.bias is layer.bias and module.bn is bn
    calibrate(module, shape)
    module.train()
    torch.manual_seed(2)
    x, target = torch.randn(32, *shape), torch.rand(32, 6, 6, 6)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = (module(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert module.weight is layer.weight and module.bn.weight is bn.weight


# -- checkpoints and copies -----------------------------------------------------------------------
def roundtrip(module, cls, bias=True):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    fresh, _ = fused(cls, bias=bias, seed=11)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cls", [QuantConvBnReLU1d, QuantConvBn3d, QuantLinearBn1d])
def test_state_dict_and_deepcopy_give_identical_outputs(cls, fold):
    module, shape = fused(cls, bias=False)
    calibrate(module, shape)
    if fold:
        module.fold_bn()
    x = torch.randn(8, *shape)
    for make_copy in (lambda m: roundtrip(m, cls, bias=False), copy.deepcopy):
        other = make_copy(module)
        assert int(other.bn_folded) == int(fold)
        assert torch.equal(other.eval()(x), module.eval()(x))
        assert torch.equal(other.train()(x), module.train()(x))  # stats updated alike
        assert torch.equal(other.bn.running_var, module.bn.running_var)
        assert (other.bias is other.bn.bias) == fold


def test_unfolded_checkpoint_restores_a_folded_module():
    module, shape = fused(QuantConvBn2d, bias=False)
    calibrate(module, shape)
    checkpoint = copy.deepcopy(module.state_dict())
    x = torch.randn(8, *shape)
    expected = module(x)
    module.fold_bn()
    module.load_state_dict(checkpoint)
    assert module.bias is None and int(module.bn_folded) == 0
    assert torch.equal(module(x), expected)


# -- going out and errors -------------------------------------------------------------------------
def test_to_float_is_the_float_equivalent_with_the_same_parameters():
    module, shape = fused(QuantConvBnReLU2d)
    float_model = module.to_float()
    assert [type(m) for m in float_model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert float_model[0].weight is module.weight and float_model[1] is module.bn
    disable_fake_quant(module)
    x = torch.randn(4, *shape)
    torch.testing.assert_close(float_model.eval()(x), module.eval()(x), atol=1e-5, rtol=1e-5)
    assert fused_bn_type(nn.Conv2d(1, 1, 1), relu=True) is QuantConvBnReLU2d
    assert fused_bn_type(nn.Linear(1, 1), relu=True) is None


def test_bad_pairs_fail_clearly():
    conv = nn.Conv2d(3, 6, 3)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        QuantConvBn2d.from_modules(conv, nn.BatchNorm2d(6, track_running_stats=False), ACT, WEIGHT)
    with pytest.raises(ValueError, match="num_features=5"):
        QuantConvBn2d.from_modules(conv, nn.BatchNorm2d(5), ACT, WEIGHT)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        QuantConvBn2d.from_modules(conv, nn.BatchNorm1d(6), ACT, WEIGHT)
    with pytest.raises(TypeError, match="exactly Conv2d"):
        QuantConvBn2d.from_modules(nn.Conv1d(3, 6, 3), nn.BatchNorm2d(6), ACT, WEIGHT)
    with pytest.raises(ValueError, match="relu=True"):
        QuantLinearBn1d.from_modules(nn.Linear(3, 6), nn.BatchNorm1d(6), ACT, WEIGHT, relu=True)
    with pytest.raises(TypeError, match="from_modules"):
        QuantConvBn2d.from_float(conv, ACT, WEIGHT)
    linear = QuantLinearBn1d.from_modules(nn.Linear(3, 6), nn.BatchNorm1d(6), ACT, WEIGHT)
    with pytest.raises(ValueError, match="2-D"):
        linear(torch.randn(2, 4, 3))
