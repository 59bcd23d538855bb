"""The registry is looked up by MRO: subclasses of registered float types are quantized as
their base (and stay instances of their own class), unless they change what the base computes
or a registration of their own (exact type first) says otherwise."""

from __future__ import annotations

import io

import torch
from torch import nn

from qat_lightning import convert, quantize_model, register_quant_module
from qat_lightning.nn import QuantConvBnReLU2d, QuantLinear, quant_type_for
from qat_lightning.surgery import calibrate


class MyLinear(nn.Linear):
    """A user's Linear that only adds an attribute."""

    def __init__(self, *args, tag: str = "mine", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag


class MyConv(nn.Conv2d):
    pass


class LoudLinear(nn.Linear):
    """Changes what the layer computes: quantizing it as an nn.Linear would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class OwnLinear(nn.Linear):
    pass


class OwnLinearChild(OwnLinear):
    pass


@register_quant_module(OwnLinear)
class QuantOwnLinear(QuantLinear, OwnLinear):
    """An exact registration for OwnLinear: it wins over nn.Linear's."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = MyConv(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = MyLinear(8 * 4 * 4, 10, tag="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def test_subclasses_are_quantized_as_their_base_and_keep_their_class() -> None:
    torch.manual_seed(0)
    model = Net()
    weight = model.fc.weight
    report = calibrate(model, [torch.randn(8, 3, 8, 8) for _ in range(2)])
    assert isinstance(model.fc, QuantLinear) and isinstance(model.fc, MyLinear)
    # a subclass fuses with its BatchNorm (and ReLU) as its base does
    assert isinstance(model.conv, QuantConvBnReLU2d) and isinstance(model.conv, MyConv)
    assert model.fc.tag == "head" and model.fc.weight is weight
    rows = {row.name: row for row in report.rows}
    assert rows["fc"].status == "quantized" and rows["fc"].after == "QuantLinear[MyLinear]"
    model.eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), convert(model)(x))
    back = model.fc.to_float()
    assert type(back) is MyLinear and back.weight is weight and back.tag == "head"
    assert type(model.conv.to_float()[0]) is MyConv


def test_the_specialised_class_is_made_once_per_subclass_and_pickles() -> None:
    assert quant_type_for(MyLinear(2, 2)) is quant_type_for(MyLinear(3, 1))
    assert quant_type_for(MyLinear(2, 2)) is not quant_type_for(MyConv(1, 1, 1))
    model = Net()
    quantize_model(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.fc) is type(model.fc) and torch.equal(loaded.fc.weight, model.fc.weight)


def test_torchs_own_linear_subclass_is_covered() -> None:
    layer = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)
    qtype = quant_type_for(layer)
    assert issubclass(qtype, QuantLinear) and issubclass(qtype, type(layer))


def test_exact_registration_wins_over_the_mro() -> None:
    assert quant_type_for(OwnLinear(2, 2)) is QuantOwnLinear
    child = quant_type_for(OwnLinearChild(2, 2))  # nearest registered base: OwnLinear
    assert issubclass(child, QuantOwnLinear) and issubclass(child, OwnLinearChild)


def test_a_subclass_that_changes_forward_stays_float_and_says_why() -> None:
    model = nn.Sequential(LoudLinear(4, 4), nn.Linear(4, 2))
    report = quantize_model(model)
    assert type(model[0]) is LoudLinear and isinstance(model[1], QuantLinear)
    row = next(r for r in report.rows if r.name == "0")
    assert row.status == "float" and "overrides forward" in row.note, row.note


def test_an_attention_subclass_with_its_own_forward_keeps_its_children_float() -> None:
    """A MultiheadAttention subclass that overrides forward is not covered by
    QuantMultiheadAttention, and it reads out_proj.weight itself: a quantized out_proj would
    never run (nor calibrate); it stays float, reported, and `convert` works. The plain
    MultiheadAttention beside it is quantized."""

    class MyAttention(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query, key, value, **kwargs)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = MyAttention(8, 2, batch_first=True)
            self.plain = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.fc(self.plain(y, y, y, need_weights=False)[0])

    torch.manual_seed(0)
    model = Block()
    report = calibrate(model, [torch.randn(4, 5, 8)])
    row = next(r for r in report.rows if r.name == "attn.out_proj")
    assert row.status == "float" and "reads its parameters directly" in row.note
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert next(r for r in report.rows if r.name == "plain").status == "quantized"
    model.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), convert(model)(x))
