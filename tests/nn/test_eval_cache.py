"""Integer eval keeps what it derives from weights and encodings (`nn.eval_cache`): after any
change to a weight, a BN statistic, an encoding or the whole state, eval mode must still equal
`convert` of the changed model bit for bit, and the cache must be no state of its own."""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

from qat_lightning.export import convert
from qat_lightning.nn import QuantConvBnReLU2d, QuantLinear
from qat_lightning.nn.eval_cache import _LINK, clear_eval_cache, eval_cache
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import quantize_model

W8A8 = {
    "inputs": {"bits": 8, "symmetric": False, "signed": False, "observer": "moving_minmax"},
    "params": {"bits": 8, "granularity": "per_channel"},
}


def resnet(seed: int = 0) -> nn.Module:
    """torchvision's resnet18 at CIFAR size (its 512-channel 3x3 convs split into several
    float32-exact ranges), quantized and calibrated."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    quantize_model(model, W8A8)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    model.train()
    with contextlib.ExitStack() as stack, torch.no_grad():
        for quantizer in quantizers:
            stack.enter_context(quantizer.compute_encodings())
        for _ in range(2):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def eval_equals_convert(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if model.training:  # (entering eval drops the cache: the cases below stay in eval)
        model.eval()
    with torch.no_grad():
        got = model(x)
        assert torch.equal(got, convert(model)(x))
    return got


def first(model: nn.Module, kind: type) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, kind))


def test_eval_is_convert_and_the_cache_is_used(x) -> None:
    model = resnet()
    eval_equals_convert(model, x)
    layer = first(model, QuantConvBnReLU2d)
    kept = eval_cache(layer)._value
    assert kept is not None
    with torch.no_grad():
        model(x)
    assert eval_cache(layer)._value is kept  # nothing changed: not recomputed


def test_a_weight_changed_in_place_is_seen(x) -> None:
    model = resnet()
    before = eval_equals_convert(model, x)
    with torch.no_grad():
        for layer in (first(model, QuantConvBnReLU2d), first(model, QuantLinear)):
            layer.weight.mul_(-1.5)
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)


def test_an_optimizer_step_is_seen(x) -> None:
    model = resnet()
    before = eval_equals_convert(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(torch.randn(8, 3, 16, 16)).square().mean().backward()
    optimizer.step()
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)


def test_bn_statistics_and_fold_bn_are_seen(x) -> None:
    model = resnet()
    before = eval_equals_convert(model, x)
    layer = first(model, QuantConvBnReLU2d)
    layer.bn.running_var.mul_(4.0)
    layer.bn.running_mean.add_(0.5)
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)
    layer.fold_bn()
    assert torch.equal(eval_equals_convert(model, x), after)


def test_a_changed_encoding_is_seen(x) -> None:
    model = resnet()
    before = eval_equals_convert(model, x)
    layer = first(model, QuantConvBnReLU2d)
    weight_quantizer = layer.param_quantizers["weight"]
    weight_quantizer.scale.mul_(3.0)  # in place: the buffer object stays
    middle = eval_equals_convert(model, x)
    assert not torch.equal(before, middle)
    output = layer.output_quantizers[0]
    output.zero_point.add_(7)
    output.scale.mul_(0.5)
    after = eval_equals_convert(model, x)
    assert not torch.equal(middle, after)


def test_load_state_dict_is_seen(x) -> None:
    model, other = resnet(0), resnet(1)
    before = eval_equals_convert(model, x)
    model.load_state_dict(other.state_dict())
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)
    assert torch.equal(after, eval_equals_convert(other, x))


def test_replaced_parameter_data_is_seen(x) -> None:
    model = resnet()
    before = eval_equals_convert(model, x)
    layer = first(model, QuantLinear)
    layer.weight.data = layer.weight.data * 2 + 0.1  # a new tensor, same Parameter object
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)


def test_a_write_through_data_is_seen_once_eval_is_entered_again(x) -> None:
    # ``.data`` writes bump no version counter; entering eval (as each validation run does)
    # starts the cache afresh
    model = resnet()
    before = eval_equals_convert(model, x)
    layer = first(model, QuantLinear)
    with torch.no_grad():
        layer.weight.data.mul_(2).add_(0.1)
    model.eval()
    after = eval_equals_convert(model, x)
    assert not torch.equal(before, after)


def test_the_cache_is_not_state_and_copies_start_empty(x) -> None:
    model = resnet()
    keys = set(model.state_dict())
    eval_equals_convert(model, x)
    assert set(model.state_dict()) == keys
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = first(clone, QuantConvBnReLU2d)
        assert eval_cache(layer)._value is None
        assert torch.equal(eval_equals_convert(clone, x), eval_equals_convert(model, x))


def test_train_and_to_drop_the_cache(x) -> None:
    model = resnet()
    eval_equals_convert(model, x)
    layer = first(model, QuantConvBnReLU2d)
    model.train()
    assert eval_cache(layer)._value is None
    eval_equals_convert(model, x)
    model.to("cpu", torch.float32)
    assert eval_cache(layer)._value is None
    clear_eval_cache(layer)
    eval_equals_convert(model, x)


def test_an_output_written_in_place_is_quantized_again(x) -> None:
    model = resnet()
    stem, block = model.conv1, model.layer1[0].conv1  # stem's output feeds the block
    with torch.no_grad():
        y = stem(x)
        assert _LINK in y.__dict__
        plain = y.clone()  # the same values, no codes attached
        assert torch.equal(block(y), block(plain))
        y.mul_(1.7)
        plain.mul_(1.7)
        assert torch.equal(block(y), block(plain))


def test_inference_mode_is_convert_too(x) -> None:
    model = resnet()
    with torch.no_grad():
        expected = convert(model)(x)
    with torch.inference_mode():
        y = model(x)
        again = model(x)  # the weights' cache is used; the outputs carry no codes
        assert _LINK not in model.conv1(x).__dict__
    assert torch.equal(y, expected) and torch.equal(again, expected)
