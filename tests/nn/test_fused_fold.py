"""Fused Conv/Linear + BatchNorm (+ReLU) going out: the integer simulation, exact BN folding,
checkpoints and copies (folded or not).

Training-time behaviour: `test_fused.py`.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from fused_cases import (
    ACT,
    ALL,
    WEIGHT,
    calibrate,
    float_pair,
    fused,
    pool,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.nn import (
    QuantConv2d,
    QuantConvBn2d,
    QuantConvBn3d,
    QuantConvBnReLU1d,
    QuantLinearBn1d,
    fake_quant_eval,
)
from qat_lightning.nn.integer import quantize_bias


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
