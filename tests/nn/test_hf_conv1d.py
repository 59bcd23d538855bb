"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b``, ``W`` of shape
``(in, out)``) is quantized by a family registered lazily: the package never imports
``transformers``, the weight's channel axis is its output axis (1), and the integer model
computes exactly what a quantized ``nn.Linear`` with the transposed weight computes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qat_lightning
from qat_lightning import convert, quantize_model
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantLinear, QuantModule, quant_type_for
from qat_lightning.quant.grouped import GroupSizeError
from qat_lightning.surgery import calibrate
from qat_lightning.surgery.calibrate import compute_encodings

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D


def test_the_package_never_imports_transformers() -> None:
    """transformers is a dev dependency only: no module of the package imports it (lightning's
    torchmetrics may, on its own, where it is installed)."""
    importers = []
    for path in Path(qat_lightning.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            if any(n.split(".")[0] == "transformers" for n in names):
                importers.append(str(path))
    assert importers == []


def test_conv1d_and_its_subclasses_get_the_quantized_family() -> None:
    class MyConv1D(Conv1D):
        """A subclass that keeps Conv1D's methods."""

    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), MyConv1D(4, 12))
    weight = model[0].weight
    report = quantize_model(model)
    assert report.row("0").after == "QuantHFConv1D" and report.row("0").status == "quantized"
    assert report.row("2").status == "quantized"
    assert isinstance(model[0], Conv1D) and isinstance(model[0], QuantModule)
    assert isinstance(model[2], MyConv1D)
    assert model[0].weight is weight  # the float Parameter is shared, not copied
    quantizer = model[0].param_quantizers["weight"]
    assert quantizer.scheme.per_channel and quantizer.scheme.axis == 1
    assert model[0].weight_channel_axis() == 1
    back = model[0].to_float()
    assert type(back) is Conv1D and back.weight is weight
    assert quant_type_for(back) is type(model[0])


def _pair(nx: int, nf: int, params: dict) -> tuple[nn.Module, nn.Module]:
    """A quantized Conv1D and a quantized Linear holding its transposed weight."""
    conv = Conv1D(nf, nx)
    nn.init.normal_(conv.bias, std=0.1)
    linear = nn.Linear(nx, nf)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    conv_model, linear_model = nn.Sequential(conv), nn.Sequential(linear)
    for model in (conv_model, linear_model):
        quantize_model(model, params=params, inputs={"observer": "minmax"})
    return conv_model, linear_model


@settings(max_examples=12, deadline=None)
@given(
    nx=st.integers(1, 40),
    nf=st.integers(1, 40),
    bits=st.sampled_from([4, 8]),
    granularity=st.sampled_from(["per_tensor", "per_channel"]),
    seed=st.integers(0, 2**16),
)
def test_integer_conv1d_is_the_integer_linear_of_its_transpose(
    nx: int, nf: int, bits: int, granularity: str, seed: int
) -> None:
    torch.manual_seed(seed)
    conv_model, linear_model = _pair(nx, nf, {"bits": bits, "granularity": granularity})
    batches = [torch.randn(6, 3, nx) * 2 for _ in range(2)]
    for model in (conv_model, linear_model):
        compute_encodings(model, batches)
        model.eval()
    conv_q = conv_model[0].param_quantizers["weight"]
    linear_q = linear_model[0].param_quantizers["weight"]
    assert torch.equal(conv_q.encoding()[0], linear_q.encoding()[0])  # scales per out feature
    # (the float outputs the output observers saw differ in their last bits: addmm vs linear)
    encodings = {k: v for k, v in conv_model.state_dict().items() if "quantizers" in k}
    linear_model.load_state_dict(encodings, strict=False)
    x = torch.randn(5, 3, nx) * 2
    with torch.no_grad():
        integer, expected = conv_model(x), linear_model(x)
        converted = convert(conv_model)(x)
    assert torch.equal(integer, expected)  # the same integer arithmetic, the same codes
    assert torch.equal(integer, converted)  # eval is the converted model, bit for bit


def test_a_train_step_reaches_the_weight_through_the_fake_quantizer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 10))
    calibrate(model, [torch.randn(8, 10) for _ in range(2)])
    model.train()
    model(torch.randn(8, 10)).square().mean().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[0].bias.grad.abs().sum() > 0


def test_convert_keeps_the_in_out_weight_layout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 10))
    calibrate(model, [torch.randn(8, 10) for _ in range(2)])
    layer = convert(model)[0]
    assert isinstance(layer, IntegerLayer) and layer.weight_shape == (10, 6)
    assert layer.weight_scale.shape == (6,)  # one scale per output feature
    codes = layer.weight_qtensor().dequantize()
    assert (codes - model[0].weight).abs().max() <= layer.weight_scale.max() / 2 + 1e-6


def test_per_group_weights_are_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 16), Conv1D(8, 16))
    with pytest.raises(GroupSizeError, match=r"layer '1' \(Conv1D\).*per_group.*nn\.Linear"):
        quantize_model(model, params={"granularity": "per_group", "group_size": 8, "bits": 4})


def test_a_lazy_registration_makes_its_type_on_first_sight_only(monkeypatch) -> None:
    from qat_lightning.nn import QUANT_MODULES, register_lazy_quant_module, registry

    monkeypatch.setattr(registry, "_LAZY", dict(registry._LAZY))
    monkeypatch.setattr(registry, "QUANT_MODULES", QUANT_MODULES)
    made: list[type] = []

    class Gate(nn.Linear):
        def forward(self, x):  # overrides Linear.forward: the MRO lookup does not cover it
            return torch.sigmoid(super().forward(x))

    Gate.__module__, Gate.__qualname__ = "optional_dependency.layers", "Gate"

    def factory(float_type: type) -> type:
        made.append(float_type)
        return type("QuantGate", (QuantLinear, float_type), {})

    register_lazy_quant_module("optional_dependency.layers", "Gate", factory)
    assert made == []  # nothing is made (nor imported) at registration
    gate = Gate(3, 2)
    try:
        qtype = quant_type_for(gate)
        assert made == [Gate] and qtype.__name__ == "QuantGate" and QUANT_MODULES[Gate] is qtype
        assert quant_type_for(Gate(2, 2)) is qtype and made == [Gate]  # made once
    finally:
        QUANT_MODULES.pop(Gate, None)
    with pytest.raises(ValueError, match="register_lazy_quant_module"):
        register_lazy_quant_module("", "Gate", factory)
