"""Integer simulation against fake quantization, for every family of quantized module.

The contract: ``quantized_forward`` on the input codes gives the codes of the fake-quant
``forward``'s output (eval mode, under `fake_quant_eval`, the arithmetic training uses) within
1 LSB on >= 99% of elements, and the same top-1 class on >= 99.5% of inputs where the output is
a classifier's. Eval mode's own forward *is* the integer simulation: test_integer_eval.py.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from family_cases import CASES, SCHEMES, Case, build, calibrate, codes_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import nn as qnn
from qat_lightning.nn import QUANT_MODULES, QuantModule
from qat_lightning.quant import QTensor, Quantizer, QuantScheme

HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_within_one_lsb(expected: torch.Tensor, got: QTensor, share: float = 0.99) -> None:
    assert got.codes.shape == expected.shape
    diff = (expected.long() - got.codes.long()).abs()
    within = (diff <= 1).float().mean().item()
    assert within >= share, f"only {within:.2%} of codes within 1 LSB (max diff {diff.max()})"


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_quantized_forward_agrees_with_forward(case: Case, scheme: str) -> None:
    q = calibrate(build(case, *SCHEMES[scheme]), case)
    args = case.inputs(256, torch.Generator().manual_seed(7))
    expected, got = codes_pair(q, case, args)
    assert_within_one_lsb(expected, got)
    if case.classifier and scheme != "int4":  # int4: its own test below, on 256 inputs
        assert top1_agreement(q(*args), got) >= 0.995


def top1_agreement(logits: torch.Tensor, got: QTensor) -> float:
    return (logits.argmax(-1) == got.dequantize().argmax(-1)).float().mean().item()


def test_int4_classifier_top1_agreement() -> None:
    # Holds because forward rounds the bias to int32 at s_in * s_w as integer mode does
    # (QuantModule.fq_bias); with a float bias, 4-bit logits flip on ~1.6% of inputs.
    case = next(c for c in CASES if c.classifier)
    q = calibrate(build(case, *SCHEMES["int4"]), case)
    args = case.inputs(256, torch.Generator().manual_seed(7))
    _, got = codes_pair(q, case, args)
    with torch.no_grad(), qnn.fake_quant_eval():
        assert top1_agreement(q(*args), got) >= 0.995


class TinyNet(nn.Module):
    """conv-relu, a max-pool/upsample branch, a residual add, GAP and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.add = qnn.Add()
        self.act = nn.Hardswish()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.conv(x))
        c = self.act(self.add(a, self.up(self.pool(a))))
        return self.fc(self.gap(c).flatten(1))

    def integer_forward(self, x: torch.Tensor) -> QTensor:
        a = self.relu.quantized_forward(
            self.conv.quantized_forward(self.conv.input_quantizers[0].quantize(x))
        )
        b = self.up.quantized_forward(self.pool.quantized_forward(a))
        c = self.act.quantized_forward(self.add.quantized_forward(a, b))
        g = self.gap.quantized_forward(c)
        flat = QTensor(g.codes.flatten(1), g.scale, g.zero_point, g.scheme)
        return self.fc.quantized_forward(flat)


def quantize_tiny_net(inputs: QuantScheme, params: QuantScheme) -> TinyNet:
    """Swap every child by the registry; each activation is quantized once, by its producer."""
    torch.manual_seed(0)
    net = TinyNet()
    for name, child in list(net.named_children()):
        q = QUANT_MODULES[type(child)].from_float(child, inputs, params)
        if name != "conv":
            for i in range(len(q.input_quantizers)):
                q.input_quantizers[i] = None
        setattr(net, name, q)
    return net


@pytest.mark.parametrize("scheme", ["int8", "int8-per-tensor"])
def test_chained_integer_network_keeps_top1(scheme: str) -> None:
    net = quantize_tiny_net(*SCHEMES[scheme])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), ExitStack() as stack:
        for m in net.children():
            stack.enter_context(m.compute_encodings())
        for _ in range(4):
            net(torch.randn(32, 3, 8, 8, generator=gen))
    net.eval()
    x = torch.randn(256, 3, 8, 8, generator=gen)
    with torch.no_grad(), qnn.fake_quant_eval():
        expected = net(x)
        got = net.integer_forward(x)
    assert_within_one_lsb(net.fc.output_quantizers[0].quantize(expected).codes, got)
    assert top1_agreement(expected, got) >= 0.995


def _calibrated(module: QuantModule, *inputs: torch.Tensor) -> QuantModule:
    with torch.no_grad(), module.compute_encodings():
        module(*inputs)
    return module.eval()


act_schemes = st.builds(
    lambda bits, affine, signed: QuantScheme(bits=bits, symmetric=not affine, signed=signed),
    st.integers(2, 12),
    st.booleans(),
    st.booleans(),
)
activations = [c for c in CASES if hasattr(c.quant_type, "lookup_table")]


@HYPOTHESIS
@given(
    case=st.sampled_from(activations),
    inputs=act_schemes,
    outputs=act_schemes,
    spread=st.floats(0.1, 8.0),
)
def test_activation_is_a_lookup_table_equal_to_forward(case, inputs, outputs, spread) -> None:
    q = case.quant_type.from_float(case.make_float(), inputs, None)
    q.output_quantizers[0] = Quantizer(outputs)
    x = torch.randn(512, generator=torch.Generator().manual_seed(0)) * spread
    _calibrated(q, x)
    q_in = q.input_quantizers[0].quantize(x)
    table = q.lookup_table(q_in)
    assert table.numel() == inputs.qmax - inputs.qmin + 1
    got = q.quantized_forward(q_in)
    assert torch.equal(got.codes, table[q_in.codes.long() - inputs.qmin])
    with torch.no_grad():
        assert torch.equal(got.codes, q.output_quantizers[0].quantize(q(x)).codes)


@HYPOTHESIS
@given(
    kind=st.sampled_from(["max", "avg"]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    pad=st.integers(0, 1),
    ceil_mode=st.booleans(),
    count_include_pad=st.booleans(),
    divisor=st.sampled_from([None, 1, 3, 7]),
    size=st.integers(5, 9),
    bits=st.integers(2, 8),
)
def test_pool2d_options_are_honoured(
    kind, kernel, stride, pad, ceil_mode, count_include_pad, divisor, size, bits
) -> None:
    pad = min(pad, kernel // 2)
    if kind == "max":
        pool = nn.MaxPool2d(kernel, stride, pad, ceil_mode=ceil_mode)
    else:
        pool = nn.AvgPool2d(kernel, stride, pad, ceil_mode, count_include_pad, divisor)
    scheme = QuantScheme(bits=bits, symmetric=False, signed=False)
    q = QUANT_MODULES[type(pool)].from_float(pool, scheme, None)
    x = torch.randn(16, 2, size, size, generator=torch.Generator().manual_seed(bits))
    _calibrated(q, x)
    with torch.no_grad():
        y = q(x)
        assert y.shape == pool(x).shape
    grid = q.output_quantizers[0] or q.input_quantizers[0]
    got = q.quantized_forward(q.input_quantizers[0].quantize(x))
    if kind == "max":  # the max of codes is exact
        assert torch.equal(got.codes, grid.quantize(y).codes)
    else:
        assert_within_one_lsb(grid.quantize(y).codes, got)


@HYPOTHESIS
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    data=st.data(),
    per_channel=st.booleans(),
    bits=st.sampled_from([4, 6, 8]),
)
def test_conv_transpose_geometry(
    groups, in_per_group, out_per_group, kernel, stride, dilation, data, per_channel, bits
) -> None:
    padding = data.draw(st.integers(0, dilation * (kernel - 1) // 2), label="padding")
    output_padding = data.draw(st.integers(0, max(stride, dilation) - 1), label="output_padding")
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(
        in_per_group * groups,
        out_per_group * groups,
        kernel,
        stride,
        padding,
        output_padding,
        groups,
        dilation=dilation,
    )
    params = QuantScheme(bits=bits, granularity="per_channel" if per_channel else "per_tensor")
    q = qnn.QuantConvTranspose2d.from_float(conv, QuantScheme(bits=bits), params)
    x = torch.randn(8, in_per_group * groups, 5, 4, generator=torch.Generator().manual_seed(1))
    _calibrated(q, x)
    if per_channel:
        assert q.param_quantizers["weight"].scale.shape == (out_per_group,)
    with torch.no_grad():
        y = q(x)
        assert y.shape == conv(x).shape
    got = q.quantized_forward(q.input_quantizers[0].quantize(x))
    assert_within_one_lsb(q.output_quantizers[0].quantize(y).codes, got)


def test_conv_transpose_output_size_is_honoured() -> None:
    conv = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
    q = qnn.QuantConvTranspose2d.from_float(conv, SCHEMES["int8"][0], SCHEMES["int8"][1])
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad(), q.compute_encodings():
        q(x, output_size=[10, 10])
    q.eval()
    with torch.no_grad():
        y = q(x, output_size=[10, 10])
    assert y.shape == conv(x, output_size=[10, 10]).shape == (4, 4, 10, 10)
    got = q.quantized_forward(q.input_quantizers[0].quantize(x), output_size=[10, 10])
    assert_within_one_lsb(q.output_quantizers[0].quantize(y).codes, got)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3)


@HYPOTHESIS
@given(
    op=st.sampled_from([qnn.QuantAdd, qnn.QuantMul]),
    shape=shapes,
    mask=st.lists(st.booleans(), min_size=3, max_size=3),
    bits=st.integers(2, 8),
    affine=st.booleans(),
)
def test_add_mul_broadcast_agree_with_forward(op, shape, mask, bits, affine) -> None:
    b_shape = [1 if m else n for n, m in zip(shape, mask, strict=False)]
    q = op.create(QuantScheme(bits=bits, symmetric=not affine, signed=not affine))
    gen = torch.Generator().manual_seed(bits)
    a, b = torch.randn(4, *shape, generator=gen), torch.randn(1, *b_shape, generator=gen)
    _calibrated(q, a, b)
    with torch.no_grad():
        expected = q.output_quantizers[0].quantize(q(a, b)).codes
    got = q.quantized_forward(q.input_quantizers[0].quantize(a), q.input_quantizers[1].quantize(b))
    assert (expected.long() - got.codes.long()).abs().max() <= 1
