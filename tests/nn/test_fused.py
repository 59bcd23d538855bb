"""Fused Conv/Linear + BatchNorm (+ReLU) in training: QAT fold simulation against float and
torch.ao, BN freezing, gradients and shared parameters, going back to float, errors.

Folding, integer mode and checkpoints: `test_fused_fold.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fused_cases import (
    ACT,
    ALL,
    WEIGHT,
    calibrate,
    disable_fake_quant,
    float_pair,
    float_reference,
    fused,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.nn import (
    QuantConvBn2d,
    QuantConvBnReLU2d,
    QuantLinearBn1d,
)
from qat_lightning.nn.fused import fused_bn_type


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
