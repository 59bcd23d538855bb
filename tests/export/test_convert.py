"""convert(): integer weights, folded BN, and the integer simulation as a module."""

from __future__ import annotations

import pytest
import torch
from export_helpers import U8, W8, calibrate, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.export import NotCalibratedError, convert, layer_report
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.qdq import pack_int4, unpack_int4
from qat_lightning.nn import QuantConv2d, QuantLinear
from qat_lightning.quant import QuantScheme


def test_converted_model_is_the_chained_integer_simulation() -> None:
    model = small_cnn()
    x = torch.randn(8, 3, 16, 16)
    first, second, pool, flatten, head = model
    with torch.no_grad():
        q = first.quantized_forward(first.input_quantizers[0].quantize(x))
        q = second.quantized_forward(q)
        q = pool.forward(q.dequantize())  # a float max pool keeps the grid
        q = second.output_quantizers[0].quantize(flatten(q))
        expected = head.quantized_forward(q).dequantize()
        got = convert(model)(x)
    assert torch.equal(got, expected)


def test_converted_model_stays_within_one_lsb_of_fake_quant() -> None:
    model = small_cnn()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        fake, integer = model(x), convert(model)(x)
    lsb = model[-1].output_quantizers[0].scale.item()
    assert ((fake - integer).abs() <= lsb * 1.001).float().mean() >= 0.99


@pytest.mark.parametrize(
    ("bits", "dtype", "bytes_per_weight"),
    [
        (8, torch.int8, 1.0),
        (4, torch.uint8, 0.5),
        (2, torch.uint8, 0.5),
        (6, torch.int8, 1.0),
        (12, torch.int16, 2.0),
    ],
)
def test_weights_are_stored_as_integer_codes(bits, dtype, bytes_per_weight) -> None:
    model = small_cnn(params=W8.replace(bits=bits))
    converted = convert(model)
    layers = [m for m in converted.modules() if isinstance(m, IntegerLayer)]
    assert len(layers) == 3
    for layer in layers:
        assert not list(layer.parameters())  # no float weight is left
        numel = torch.Size(layer.weight_shape).numel()
        assert layer.weight_codes.dtype == dtype
        assert layer.weight_codes.numel() * layer.weight_codes.element_size() == pytest.approx(
            numel * bytes_per_weight, abs=1
        )
        assert layer.bias_codes.dtype == torch.int32
        codes = layer.weight_int_codes()
        scheme = layer.weight_scheme
        assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax


def test_batch_norm_is_folded() -> None:
    converted = convert(small_cnn())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert converted[0].relu  # the fused ReLU survives as part of the integer layer


def test_the_qat_model_is_left_untouched() -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model[1], QuantConv2d)


def test_an_uncalibrated_model_is_refused_naming_the_layer() -> None:
    torch.manual_seed(0)
    first = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), U8, W8)
    head = QuantLinear.from_float(nn.Linear(4 * 14 * 14, 2), U8, W8)
    model = nn.Sequential(first, nn.Flatten(), head)
    calibrate(nn.Sequential(first), [torch.randn(4, 3, 16, 16)])  # the head never sees data
    with pytest.raises(NotCalibratedError, match=r"layer '2' \(QuantLinear\).*input 0"):
        convert(model)


def test_layers_without_an_input_encoding_run_in_fake_quant_and_are_reported() -> None:
    torch.manual_seed(0)
    head = QuantLinear.from_float(nn.Linear(8, 2), U8, W8)
    head.input_quantizers[0] = None  # but its producer is a float layer: no encoding
    model = calibrate(nn.Sequential(nn.Linear(4, 8), head), [torch.randn(16, 4)])
    with pytest.warns(UserWarning, match="fake quant"):
        converted = convert(model)
    assert isinstance(converted[1], QuantizedOp) and not bool(converted[1].integer_mode)
    report = layer_report(converted)
    assert report["float_layers"] == ["0", "1"]
    with torch.no_grad():
        assert torch.equal(converted(torch.ones(2, 4)), model(torch.ones(2, 4)))


@settings(max_examples=50, deadline=None)
@given(
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_int4_packing_round_trips(signed: bool, shape: list[int], seed: int) -> None:
    low, high = (-8, 8) if signed else (0, 16)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(low, high, shape, generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
    assert torch.equal(unpack_int4(packed, codes.shape, signed), codes)


def test_int4_nibble_order_is_onnx_order() -> None:
    # ONNX INT4: element 0 in the low nibble, element 1 in the high nibble.
    packed = pack_int4(torch.tensor([1, -2, 7], dtype=torch.int8))
    assert packed.tolist() == [0xE1, 0x07]


def test_a_per_channel_activation_scheme_falls_back_to_fake_quant() -> None:
    scheme = QuantScheme(bits=8, granularity="per_channel", axis=1)
    torch.manual_seed(0)
    model = calibrate(
        nn.Sequential(QuantConv2d.from_float(nn.Conv2d(3, 4, 3), scheme, W8)),
        [torch.randn(4, 3, 8, 8)],
    )
    with pytest.warns(UserWarning):
        converted = convert(model)
    assert isinstance(converted[0], QuantizedOp)


def test_a_surgery_quantized_model_converts_from_its_recorded_producers(monkeypatch) -> None:
    """convert reads the producers surgery recorded; it traces only hand-built models."""
    import importlib

    from qat_lightning.surgery import quantize_model

    convert_module = importlib.import_module("qat_lightning.export.convert")

    traced = []

    def no_trace(*args, **kwargs):
        traced.append(True)
        raise RuntimeError("convert traced a model whose producers surgery recorded")

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    quantize_model(model)
    calibrate(model, [torch.randn(16, 3, 16, 16) for _ in range(2)])
    monkeypatch.setattr(convert_module._LeafTracer, "trace", no_trace)
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(convert(model)(x), model.eval()(x))
    assert not traced
