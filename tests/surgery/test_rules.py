"""Overrides, skips, fallbacks and bad input of quantize_model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from surgery_cases import Branchy, Residual, SmallNet, calibrate, set_fake_quant
from torch import nn

from qat_lightning.nn import QuantCat, QuantConvBnReLU2d, QuantModule
from qat_lightning.quant import QuantScheme
from qat_lightning.surgery import QuantConfig, quantize_model
from qat_lightning.surgery.config import DEFAULT_INPUTS, DEFAULT_PARAMS


def weight_bits(module: nn.Module) -> int | None:
    quantizer = module.param_quantizers["weight"] if isinstance(module, QuantModule) else None
    return None if quantizer is None else quantizer.scheme.bits


def test_overrides_and_skips_change_exactly_the_matched_modules():
    model = torchvision.models.resnet18(weights=None)
    float_types = {n: type(m) for n, m in model.named_modules()}
    report = quantize_model(
        model,
        params={"bits": 6, "granularity": "per_channel"},
        skip=["fc", "*.downsample.*"],
        overrides={"fc": {"params": {"bits": 8}}, "layer4.*": {"params": {"bits": 4}}},
    )
    assert report.warnings == []
    for name, before in float_types.items():
        module = model.get_submodule(name)
        if name == "fc" or ".downsample." in name:
            assert type(module) is before  # left float
            assert report.row(name).status == "skipped"
            assert "skip pattern" in report.row(name).note
        elif issubclass(before, nn.Conv2d):
            assert weight_bits(module) == (4 if name.startswith("layer4.") else 6), name
    # the skipped downsample feeds the add: that input keeps its quantizer, the other not
    add = model.layer2[0].add
    assert add.input_quantizers[0] is None and add.input_quantizers[1] is not None


def test_an_input_override_keeps_the_input_quantizer_where_grids_differ():
    model = torchvision.models.resnet18(weights=None)
    quantize_model(model, overrides={"layer4.*": {"inputs": {"bits": 4}}})
    block = model.layer4[0]
    # layer3 hands over 8-bit codes: layer4's first modules requantize them to 4 bits ...
    assert block.conv1.input_quantizers[0].scheme.bits == 4
    assert block.downsample[0].input_quantizers[0] is not None
    # ... inside layer4 the grids agree, so inputs are not quantized twice
    assert block.conv2.input_quantizers[0] is None
    assert model.layer4[1].conv1.input_quantizers[0] is None
    assert model.avgpool.input_quantizers[0] is not None  # back to 8 bits after layer4
    assert model.fc.input_quantizers[0] is None


def test_untraceable_model_falls_back_to_module_order():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    report = quantize_model(model)
    assert not report.traced
    assert any("fused by module order" in w and "Branchy" in w for w in report.warnings)
    assert isinstance(model.conv, QuantConvBnReLU2d)
    assert isinstance(model.bn, nn.Identity) and isinstance(model.relu, nn.Identity)
    # the child block traces on its own: graph fusion and its residual add still happen
    assert isinstance(model.block.conv1, QuantConvBnReLU2d) and report.rewritten == ["block"]
    assert model.block.add.input_quantizers[0] is None  # pruned inside the traced block
    # without a graph of the root, its children keep every input quantizer
    for child in (model.conv, model.block.conv1, model.pool, model.fc):
        assert child.input_quantizers[0] is not None
    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)


def test_functional_relu_is_fused_and_removed_and_cat_quantized():
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    report = quantize_model(model)
    assert isinstance(model.block.conv1, QuantConvBnReLU2d)  # F.relu after bn1 went inside
    assert "relu" not in model.block.code.split("self.add")[0]  # ... and out of the code
    assert isinstance(model.merge.cat, QuantCat) and model.merge.cat.dim == 1
    assert report.kept_input_quantizers == ["stem.0"]
    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-6)


class RootAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_functional_op_in_the_root_forward_is_reported_float():
    model = RootAdd()
    report = quantize_model(model)
    assert type(model) is RootAdd
    row = report.row("add")
    assert row.status == "float" and "root" in row.note
    assert report.counts == {"quantized": 2, "fused": 0, "skipped": 0, "float": 1}


class Gate(nn.Module):
    """A user module with its own parameter and a non-registered leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)) * self.scale


def test_every_float_parameter_is_reported():
    model = nn.Sequential(Gate(), nn.Dropout(), nn.Identity())
    report = quantize_model(model)
    assert report.row("0.fc").status == "quantized"
    for name in ("0", "0.norm"):  # the Gate's own scale, the GroupNorm
        assert report.row(name).status == "float" and report.row(name).note
    assert [r.name for r in report.rows] == ["0", "0.fc", "0.norm"]  # Dropout/Identity: no row
    # ``* self.scale`` multiplies by a parameter, not an activation: left float
    assert not any(r.before == "mul()" for r in report.rows)


def test_fuse_false_and_float_activations():
    model = torchvision.models.resnet18(weights=None)
    report = quantize_model(model, fuse=False, inputs=None)
    assert type(model.conv1).__name__ == "QuantConv2d"
    # no fusion and no activation quantization: a standalone BatchNorm has nothing to gain
    assert report.row("bn1").status == "float" and "nothing to quantize" in report.row("bn1").note
    assert type(model.bn1) is nn.BatchNorm2d
    assert all(q is None for q in model.conv1.input_quantizers)
    assert all(q is None for q in model.conv1.output_quantizers)
    adds = [r for r in report.rows if r.before == "add()"]
    assert len(adds) == 8 and all(r.status == "float" for r in adds)


def test_config_errors_name_the_field():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="unknown key 'weights'"):
        quantize_model(model, overrides={"fc": {"weights": {"bits": 4}}})
    with pytest.raises(ValueError, match=r"overrides\['fc'\]\['params'\].*bits=1"):
        quantize_model(model, overrides={"fc": {"params": {"bits": 1}}})
    with pytest.raises(ValueError, match="no field 'bitz'"):
        quantize_model(model, params={"bitz": 4})
    with pytest.raises(ValueError, match=r"QuantScheme\.granularity"):
        quantize_model(model, inputs={"granularity": "per_row"})
    with pytest.raises(ValueError, match="QuantConfig has no field 'skips'"):
        quantize_model(model, skips=["fc"])
    with pytest.raises(ValueError, match=r"QuantConfig\.skip"):
        QuantConfig(skip=[3])
    assert not any(isinstance(m, QuantModule) for m in model.modules())  # nothing happened


def test_a_pattern_matching_nothing_is_a_warning():
    model = torchvision.models.resnet18(weights=None)
    with pytest.warns(UserWarning) as caught:
        report = quantize_model(model, skip=["classifier"], overrides={"layer9.*": {"params": {}}})
    assert "override pattern 'layer9.*' matches no module" in report.warnings
    assert "skip pattern 'classifier' matches no module" in report.warnings
    messages = [str(w.message) for w in caught]
    assert any("override pattern 'layer9.*' matches no module" in m for m in messages)
    assert any("skip pattern 'classifier' matches no module" in m for m in messages)


def test_config_from_any_merges_fields_over_the_defaults():
    config = QuantConfig.from_any(
        {"params": {"bits": 4}, "skip": "fc", "overrides": {"layer4": {"params": {"bits": 8}}}}
    )
    assert config.skip == ("fc",)
    # a partial dict keeps the role's documented default for every other field
    assert config.params == DEFAULT_PARAMS.replace(bits=4)
    assert config.params.per_channel and config.params.symmetric
    inputs, params = config.schemes_for("layer4.1.conv2")  # a container pattern covers its inside
    assert params == DEFAULT_PARAMS.replace(bits=8) and inputs == config.inputs
    assert config.schemes_for("layer3.0.conv1")[1].bits == 4
    assert QuantConfig.from_any(config, fuse=False).fuse is False
    hydra = OmegaConf.create({"params": {"bits": 4}, "skip": ["fc"], "overrides": {"a": {}}})
    assert QuantConfig.from_any(hydra) == QuantConfig(
        params=DEFAULT_PARAMS.replace(bits=4), skip=("fc",), overrides={"a": {}}
    )


def test_partial_scheme_dicts_merge_over_the_role_defaults():
    acts = QuantConfig(inputs={"bits": 4}).inputs
    assert acts == QuantScheme(bits=4, symmetric=False, signed=False, observer="moving_minmax")
    assert QuantConfig().inputs == DEFAULT_INPUTS and DEFAULT_INPUTS.observer == "moving_minmax"
    config = QuantConfig(
        inputs=None,
        params={"bits": 6, "observer": "mse"},
        overrides={"fc": {"inputs": {"bits": 4}, "params": {"symmetric": False}}},
    )
    inputs, params = config.schemes_for("fc")
    # over a float role, an override dict applies over that role's default
    assert inputs == DEFAULT_INPUTS.replace(bits=4)
    # over a set role, it applies over the resolved scheme (bits 6, mse, per channel kept)
    assert params == DEFAULT_PARAMS.replace(bits=6, observer="mse", symmetric=False)
    assert config.schemes_for("conv1") == (None, DEFAULT_PARAMS.replace(bits=6, observer="mse"))
    model = SmallNet()
    quantize_model(model, params={"bits": 4}, inputs={"bits": 4})
    conv = next(m for m in model.modules() if isinstance(m, QuantModule))
    assert conv.param_quantizers["weight"].scheme.per_channel
    assert conv.param_quantizers["weight"].scheme.bits == 4
    out = conv.output_quantizers[0].scheme
    assert (out.bits, out.signed, out.symmetric, out.observer) == (4, False, False, "moving_minmax")


def test_both_roles_none_quantize_nothing_and_are_an_error():
    with pytest.raises(ValueError, match=r"inputs=None, params=None.*quantizes nothing"):
        QuantConfig(inputs=None, params=None)
    only_fc = QuantConfig(inputs=None, params=None, overrides={"fc": {"params": {"bits": 4}}})
    assert only_fc.schemes_for("fc")[1] == DEFAULT_PARAMS.replace(bits=4)


@pytest.mark.slow
def test_torch_compile_of_a_quantized_model():
    torch.manual_seed(0)
    model = nn.Sequential(Residual(4)).eval()  # small: each quantizer is a graph break
    quantize_model(model)
    assert isinstance(model[0], torch.fx.GraphModule)
    calibrate(model, [torch.randn(4, 4, 8, 8)])
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)(x)
    assert torch.allclose(compiled, expected, atol=1e-5)
