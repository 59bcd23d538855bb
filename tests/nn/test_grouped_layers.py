"""Per-group weights and dynamic activations in Linear / Embedding: attach-time checks, LSQ,
eval-mode integer simulation == `convert` bit for bit, and agreement with fake quant."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.callback.health import HealthProbe
from qat_lightning.callback.progress import is_calibrated
from qat_lightning.export import check_calibrated, convert, export_onnx, save_quantized
from qat_lightning.nn import QuantModule, fake_quant_eval
from qat_lightning.nn.grouped import grouped_linear
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.grouped import GroupSizeError
from qat_lightning.surgery import QuantConfig, quantize_model

W4G32 = {"bits": 4, "granularity": "per_group", "group_size": 32}
PER_TOKEN = {"dynamic": True, "granularity": "per_token"}
CONFIGS = {
    "a8_w4g32": ({"bits": 8}, W4G32),
    "8da4w": ({**PER_TOKEN, "signed": True}, W4G32),
    "a8dyn_tensor_w8pc": ({"dynamic": True}, {"bits": 8}),
    "w4g32_only": (None, W4G32),
}


class TinyLM(nn.Module):
    """Embedding -> two Linear with a GELU -> a head: the layer kinds of a decoder LM."""

    def __init__(self, vocab: int = 40, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        return self.head(h + self.down(self.act(self.up(h))))


def _quantized(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    inputs, params = CONFIGS[name]
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float leftovers (the GELU) are reported, not tested
        quantize_model(model, QuantConfig(inputs=inputs, params=params))
    idx = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(3):  # observers run in training
        model(idx)
    return model.eval(), idx


def test_a_group_size_that_does_not_divide_names_the_layer() -> None:
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    with pytest.raises(GroupSizeError, match=r"layer '2' \(Linear\).*\(100.*group_size=32"):
        quantize_model(model, QuantConfig(inputs=None, params=W4G32))
    table = nn.Sequential(nn.Embedding(10, 48))
    with pytest.raises(GroupSizeError, match=r"layer '0'.*\(48.*group_size=32.*embedding dim"):
        quantize_model(table, QuantConfig(inputs=None, params=W4G32))


def test_per_group_on_a_conv_is_refused_naming_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    with pytest.raises(GroupSizeError, match=r"layer '0' \(Conv2d\).*2-D weights"):
        quantize_model(model, QuantConfig(inputs=None, params={**W4G32, "group_size": 8}))
    # an override makes the conv per channel and the rest per group
    overrides = {"0": {"params": {"granularity": "per_channel"}}}
    quantize_model(model, QuantConfig(inputs=None, params=W4G32, overrides=overrides))
    assert model[0].param_quantizers["weight"].scheme.per_channel
    assert model[2].param_quantizers["weight"].scale.shape == (4, 8 * 30 * 30 // 32)


def test_weights_get_one_scale_per_group_of_the_input_dimension() -> None:
    model, _ = _quantized("a8_w4g32")
    assert model.up.param_quantizers["weight"].scale.shape == (128, 2)
    assert model.down.param_quantizers["weight"].scale.shape == (64, 4)
    assert model.embed.param_quantizers["weight"].scale.shape == (40, 2)


def test_learnable_group_scales_are_trained_parameters() -> None:
    model = TinyLM()
    quantize_model(model, QuantConfig(inputs={"bits": 8}, params={**W4G32, "learnable": True}))
    scale = model.up.param_quantizers["weight"].scale
    assert isinstance(scale, nn.Parameter) and scale.shape == (128, 2)
    assert any(p is scale for p in model.parameters())  # the optimizer sees it
    idx = torch.randint(0, 40, (2, 5))
    with contextlib.ExitStack() as stack:  # calibration, as QATCallback runs it
        for module in model.modules():
            if isinstance(module, QuantModule):
                stack.enter_context(module.compute_encodings())
        model(idx)
    assert (scale != 1).any()  # initialized from the weight's groups
    model.train()
    model(idx).pow(2).mean().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_integer_equals_convert_bit_for_bit(name) -> None:
    model, idx = _quantized(name)
    check_calibrated(model)
    with torch.no_grad():
        got = model(idx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(model)
        torch.testing.assert_close(converted(idx), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["8da4w", "a8dyn_tensor_w8pc", "w4g32_only"])
def test_without_an_output_grid_integer_eval_is_fake_quant_up_to_float_rounding(name) -> None:
    model, idx = _quantized(name)
    layer = model.up
    x = model.embed(idx)
    with torch.no_grad():
        got = layer(x)
        with fake_quant_eval():
            simulated = layer(x)
    # exact integer sums vs float32 sums of the dequantized products
    torch.testing.assert_close(got, simulated, rtol=1e-5, atol=1e-5 * float(simulated.abs().max()))


def test_with_an_output_grid_integer_eval_is_within_one_step_of_fake_quant() -> None:
    model, idx = _quantized("a8_w4g32")
    layer = model.up
    x = model.embed(idx)
    with torch.no_grad():
        got = layer(x)
        with fake_quant_eval():
            simulated = layer(x)
    step = layer.output_quantizers[0].encoding()[0]
    assert ((got - simulated).abs() <= step * 1.01).all()
    assert ((got - simulated).abs() > step / 2).float().mean() <= 0.01


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 6),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([1, 4, 32]),
    per_token=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_linear_agrees_with_a_float64_reference(out, groups, group_size, per_token, seed):
    g = torch.Generator().manual_seed(seed)
    in_features = groups * group_size
    w = torch.randn(out, in_features, generator=g)
    x = torch.randn(5, in_features, generator=g) * 4
    bias = torch.randn(out, generator=g)
    wq = Quantizer(QuantScheme(bits=4, granularity="per_group", group_size=group_size))
    with wq.compute_encodings():
        wq(w)
    xq = Quantizer(
        QuantScheme(
            symmetric=False, granularity="per_token" if per_token else "per_tensor", dynamic=True
        )
    )
    q_in, q_w = xq.quantize(x), wq.quantize(w)
    x64 = q_in.centered(torch.int64).double() * q_in.broadcast_encoding()[0].double()
    w64 = q_w.centered(torch.int64).double() * q_w.broadcast_encoding()[0].double()
    expected = x64 @ w64.T + bias.double()
    got = grouped_linear(q_in, q_w, bias, out_dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_dynamic_activations_need_no_calibration() -> None:
    model = TinyLM()
    quantize_model(model, QuantConfig(inputs={**PER_TOKEN, "signed": True}, params=W4G32))
    assert not is_calibrated(model)  # the weights still are to calibrate
    dynamic = [m for m in model.modules() if isinstance(m, Quantizer) and m.scheme.dynamic]
    assert dynamic and all(m.is_initialized for m in dynamic)
    assert all(
        len(m.output_quantizers) == 1 and m.output_quantizers[0] is None
        for m in (model.up, model.down, model.head)
    )
    idx = torch.randint(0, 40, (2, 6))
    model.train()
    probe = HealthProbe(model).attach()
    model(idx)
    metrics = probe.detach()
    assert is_calibrated(model)
    check_calibrated(model)  # nothing raises NotCalibratedError
    name = "up.input_quantizers.0"
    x = model.embed(idx).detach()  # what the probe saw: the encoding is x's own
    noise = (x - model.up.input_quantizers[0](x)).pow(2).sum()
    sqnr = 10 * torch.log10(x.pow(2).sum() / noise)
    assert abs(metrics[f"quant/{name}/sqnr_db"] - float(sqnr)) < 1e-3
    assert f"quant/{name}/scale" not in metrics  # no bogus placeholder scale
    assert "quant/up.param_quantizers.weight/scale" in metrics


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_exporters_write_every_grouped_and_dynamic_config(name, tmp_path) -> None:
    """(Refused until the exporters wrote them; tests/export/test_dynamic_integer_export.py
    and test_per_block_encodings.py check what they write.)"""
    model, idx = _quantized(name)
    path = export_onnx(copy.deepcopy(model), idx, tmp_path / "m.onnx")
    directory = save_quantized(model, tmp_path / "native")
    assert path.is_file() and (directory / "encodings.json").is_file()
