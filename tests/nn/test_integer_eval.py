"""Eval mode runs the integer simulation: what validation reports during QAT is what the
exported integer model computes, bit for bit. Training, gradients, calibration and
`fake_quant_eval` keep fake quantization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_cases import CASES, SCHEMES, build, calibrate, quantize_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import nn as qnn
from qat_lightning.nn.integer import exact_accumulate, exact_chunks, quantize_bias
from qat_lightning.quant import Quantizer, QuantScheme

# Embedding takes indices; activations and max pools compute exactly what integer mode does
# (a lookup table over the input codes, a max of codes) and keep their fake-quant forward.
INTEGER_EVAL_CASES = [c for c in CASES if getattr(c.quant_type.forward, "__wrapped__", None)]


def test_every_family_that_accumulates_or_requantizes_runs_integer_in_eval() -> None:
    names = {c.quant_type.__name__ for c in INTEGER_EVAL_CASES}
    for required in ("QuantLinear", "QuantConv2d", "QuantConvTranspose2d", "QuantAdd"):
        assert required in names, names
    # the fused Conv/Linear+BN classes: test_fused.py::test_eval_forward_is_the_integer_simulation


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("case", INTEGER_EVAL_CASES, ids=repr)
def test_eval_forward_is_the_integer_simulation(case, scheme) -> None:
    q = calibrate(build(case, *SCHEMES[scheme]), case).eval()
    args = case.inputs(64, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = q(*args)
        expected = q.quantized_forward(*quantize_inputs(q, case, args)).dequantize()
        with qnn.fake_quant_eval():
            simulated = q(*args)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the fake-quant arithmetic stays within one output step of it
    step = q.output_quantizers[0].encoding()[0] if q.output_quantizers[0] is not None else None
    if step is not None:
        assert ((got - simulated).abs() <= step * 1.01).float().mean() >= 0.99


def test_training_and_gradients_keep_fake_quant() -> None:
    case = next(c for c in INTEGER_EVAL_CASES if c.quant_type is qnn.QuantLinear)
    q = calibrate(build(case, *SCHEMES["int4"]), case).eval()
    (x,) = case.inputs(32, torch.Generator().manual_seed(0))
    with torch.no_grad(), qnn.fake_quant_eval():
        fake = q(x)
    x = x.requires_grad_()
    y = q(x)  # grad enabled: the fake-quant graph, differentiable
    torch.testing.assert_close(y.detach(), fake, rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_uncalibrated_or_switched_off_quantizers_keep_fake_quant() -> None:
    q = qnn.QuantLinear.from_float(nn.Linear(8, 4), {"bits": 8}, {"bits": 8}).eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert not q.runs_integer((x,))  # nothing is set yet
        with q.compute_encodings():
            q(x)  # eval mode, no grad: calibration still observes
        assert all(quantizer.is_initialized for quantizer in q.quantizers())
        assert q.runs_integer((x,))
        q.output_quantizers[0].enable_fake_quant(False)
        assert not q.runs_integer((x,))


def test_a_layer_without_an_integer_form_evaluates_in_fake_quant_with_a_warning() -> None:
    pool = qnn.QuantAvgPool2d.from_float(nn.AvgPool2d(2), {"bits": 8}, None)
    pool.output_quantizers[0] = None  # an average off any grid: no integer form
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), pool.compute_encodings():
        pool(x)
    pool.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="evaluates in fake quant"):
        y = pool(x)
    with torch.no_grad(), qnn.fake_quant_eval():
        assert torch.equal(y, pool(x))


def test_a_whole_model_in_eval_matches_its_integer_simulation_exactly() -> None:
    from qat_lightning.export import convert
    from qat_lightning.surgery import quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    quantize_model(model, {"inputs": {"bits": 4}, "params": {"bits": 4}})
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
    model.eval()
    x = torch.randn(128, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), convert(model)(x))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 12),
    c_in=st.integers(1, 600),
    weight_scale=st.floats(0.01, 100.0),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_integer_accumulation_is_exact(bits, c_in, weight_scale, conv, seed) -> None:
    """float32 per provably exact range of input channels (summed in float64) gives the exact
    integer accumulator, whatever the width and the bit widths."""
    gen = torch.Generator().manual_seed(seed)
    act = Quantizer(QuantScheme(bits=bits, symmetric=False, signed=False))
    wq = Quantizer(QuantScheme(bits=bits, granularity="per_channel", axis=0), num_channels=4)
    shape = (4, c_in, 3, 3) if conv else (4, c_in)
    x = torch.randn(2, c_in, 5, 5, generator=gen) if conv else torch.randn(8, c_in, generator=gen)
    w = torch.randn(*shape, generator=gen) * weight_scale
    b = torch.randn(4, generator=gen) * weight_scale * 100
    with act.compute_encodings(), wq.compute_encodings():
        act(x * 3), wq(w)
    q_x, q_w = act.quantize(x * 3), wq.quantize(w)
    bias = quantize_bias(b, q_x.scale.double() * q_w.scale.double())
    op = (lambda x, w, b: F.conv2d(x, w, b, padding=1)) if conv else F.linear
    axis = 1 if conv else -1
    exact = op(q_x.centered(torch.int64).double(), q_w.centered(torch.int64).double(), bias)
    chunks = exact_chunks(q_x, q_w)
    got = exact_accumulate(op, q_x.centered(), q_w.centered(), bias, chunks, axis)
    assert torch.equal(got.double(), exact)
