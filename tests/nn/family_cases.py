"""One small instance of every quantized-module family, and the helpers the nn tests share.

Imported by test_families.py (numerics) and test_protocol.py (the module protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qat_lightning import nn as qnn
from qat_lightning.nn import QuantModule
from qat_lightning.quant import QTensor, QuantScheme

Args = tuple


def _randn(*shape: int, scale: float = 1.0) -> Callable[[int, torch.Generator], Args]:
    def make(batch: int, gen: torch.Generator) -> Args:
        return (torch.randn(batch, *shape, generator=gen) * scale,)

    return make


def _pair(shape_a, shape_b, as_list: bool = False) -> Callable[[int, torch.Generator], Args]:
    def make(batch: int, gen: torch.Generator) -> Args:
        a = torch.randn(batch, *shape_a, generator=gen)
        b = torch.randn(batch, *shape_b, generator=gen) * 0.5 + 0.25
        return ([a, b],) if as_list else (a, b)

    return make


def _indices(batch: int, gen: torch.Generator) -> Args:
    return (torch.randint(0, 20, (batch, 5), generator=gen),)


@dataclass
class Case:
    """A float module factory, its quantized type and an input factory."""

    name: str
    make_float: Callable[[], nn.Module]
    quant_type: type[nn.Module]
    inputs: Callable[[int, torch.Generator], Args]
    classifier: bool = False  # output is (batch, classes): top-1 agreement is checked
    list_input: bool = False  # forward takes one list of tensors (cat)
    params: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return self.name


def _case(name, make, qtype, inputs, **kw) -> Case:
    params = tuple(n for n, _ in make().named_parameters(recurse=False))
    return Case(name, make, qtype, inputs, params=params, **kw)


CASES: list[Case] = [
    _case("Linear", lambda: nn.Linear(32, 10), qnn.QuantLinear, _randn(32), classifier=True),
    _case("Conv1d", lambda: nn.Conv1d(3, 6, 3, padding=1), qnn.QuantConv1d, _randn(3, 12)),
    _case("Conv2d", lambda: nn.Conv2d(3, 6, 3, stride=2), qnn.QuantConv2d, _randn(3, 9, 9)),
    _case("Conv3d", lambda: nn.Conv3d(2, 4, 3, padding=1), qnn.QuantConv3d, _randn(2, 5, 5, 5)),
    _case(
        "ConvTranspose1d",
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1),
        qnn.QuantConvTranspose1d,
        _randn(4, 7),
    ),
    _case(
        "ConvTranspose2d",
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        qnn.QuantConvTranspose2d,
        _randn(4, 5, 5),
    ),
    _case(
        "ConvTranspose3d",
        lambda: nn.ConvTranspose3d(2, 4, 2, stride=2, dilation=1),
        qnn.QuantConvTranspose3d,
        _randn(2, 3, 3, 3),
    ),
    _case("MaxPool1d", lambda: nn.MaxPool1d(3, 2, padding=1), qnn.QuantMaxPool1d, _randn(3, 11)),
    _case(
        "MaxPool2d",
        lambda: nn.MaxPool2d(3, 2, ceil_mode=True),
        qnn.QuantMaxPool2d,
        _randn(3, 8, 8),
    ),
    _case("MaxPool3d", lambda: nn.MaxPool3d(2), qnn.QuantMaxPool3d, _randn(2, 4, 4, 4)),
    _case(
        "AdaptiveMaxPool2d",
        lambda: nn.AdaptiveMaxPool2d((2, 3)),
        qnn.QuantAdaptiveMaxPool2d,
        _randn(3, 7, 8),
    ),
    _case(
        "AvgPool1d",
        lambda: nn.AvgPool1d(3, 2, padding=1, count_include_pad=False),
        qnn.QuantAvgPool1d,
        _randn(3, 11),
    ),
    _case(
        "AvgPool2d",
        lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, divisor_override=5),
        qnn.QuantAvgPool2d,
        _randn(3, 8, 8),
    ),
    _case("AvgPool3d", lambda: nn.AvgPool3d(2), qnn.QuantAvgPool3d, _randn(2, 4, 4, 4)),
    _case(
        "AdaptiveAvgPool1d",
        lambda: nn.AdaptiveAvgPool1d(4),
        qnn.QuantAdaptiveAvgPool1d,
        _randn(3, 10),
    ),
    _case(
        "AdaptiveAvgPool2d",
        lambda: nn.AdaptiveAvgPool2d(1),
        qnn.QuantAdaptiveAvgPool2d,
        _randn(8, 5, 5),
    ),
    _case(
        "AdaptiveAvgPool3d",
        lambda: nn.AdaptiveAvgPool3d((1, 2, 2)),
        qnn.QuantAdaptiveAvgPool3d,
        _randn(2, 3, 5, 5),
    ),
    _case("ReLU", lambda: nn.ReLU(inplace=True), qnn.QuantReLU, _randn(64, scale=2.0)),
    _case("ReLU6", lambda: nn.ReLU6(inplace=True), qnn.QuantReLU6, _randn(64, scale=4.0)),
    _case("Hardtanh", lambda: nn.Hardtanh(-1.0, 2.0), qnn.QuantHardtanh, _randn(64, scale=2.0)),
    _case("LeakyReLU", lambda: nn.LeakyReLU(0.1), qnn.QuantLeakyReLU, _randn(64, scale=2.0)),
    _case("Hardswish", lambda: nn.Hardswish(), qnn.QuantHardswish, _randn(64, scale=3.0)),
    _case("Hardsigmoid", lambda: nn.Hardsigmoid(), qnn.QuantHardsigmoid, _randn(64, scale=3.0)),
    _case("Sigmoid", lambda: nn.Sigmoid(), qnn.QuantSigmoid, _randn(64, scale=3.0)),
    _case("Tanh", lambda: nn.Tanh(), qnn.QuantTanh, _randn(64, scale=2.0)),
    _case("GELU", lambda: nn.GELU(), qnn.QuantGELU, _randn(64, scale=3.0)),
    _case("GELU-tanh", lambda: nn.GELU(approximate="tanh"), qnn.QuantGELU, _randn(64, scale=3.0)),
    _case("SiLU", lambda: nn.SiLU(), qnn.QuantSiLU, _randn(64, scale=3.0)),
    _case("Add", qnn.Add, qnn.QuantAdd, _pair((4, 6), (4, 6))),
    _case("Mul", qnn.Mul, qnn.QuantMul, _pair((4, 6), (1, 6))),
    _case("MatMul", qnn.MatMul, qnn.QuantMatMul, _pair((3, 8), (8, 10))),
    _case(
        "Cat",
        lambda: qnn.Cat(dim=1, num_inputs=2),
        qnn.QuantCat,
        _pair((4, 6), (2, 6), as_list=True),
        list_input=True,
    ),
    _case(
        "Embedding",
        lambda: nn.Embedding(20, 8, padding_idx=0),
        qnn.QuantEmbedding,
        _indices,
    ),
]

INT8_ACT = QuantScheme(bits=8, symmetric=False, signed=False)  # affine, unsigned
SCHEMES: dict[str, tuple[QuantScheme, QuantScheme]] = {
    "int8": (INT8_ACT, QuantScheme(bits=8, granularity="per_channel")),
    "int8-per-tensor": (QuantScheme(bits=8), QuantScheme(bits=8, narrow_range=True)),
    "int4": (
        QuantScheme(bits=4, symmetric=False, signed=False),
        QuantScheme(bits=4, granularity="per_channel", narrow_range=True),
    ),
    "fixed-point": (
        QuantScheme(bits=8, representation="fixed_point", frac_bits=4),
        QuantScheme(bits=8, representation="fixed_point", frac_bits=4),
    ),
}


def build(case: Case, inputs: QuantScheme, params: QuantScheme, seed: int = 0) -> QuantModule:
    """The quantized twin of a freshly built float module (from_float, as surgery does)."""
    torch.manual_seed(seed)
    return case.quant_type.from_float(case.make_float(), inputs, params)


def calibrate(q: QuantModule, case: Case, batches: int = 4, batch: int = 16) -> QuantModule:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad(), q.compute_encodings():
        for _ in range(batches):
            q(*case.inputs(batch, gen))
    return q.eval()


def tensors_of(case: Case, args: Args) -> list[torch.Tensor]:
    return list(args[0]) if case.list_input else list(args)


def quantize_inputs(q: QuantModule, case: Case, args: Args) -> Args:
    """Each float input as a QTensor under its input quantizer (indices stay tensors)."""
    out = []
    for i, t in enumerate(tensors_of(case, args)):
        quantizer = q.input_quantizers[i]
        out.append(t if quantizer is None else quantizer.quantize(t))
    return (out,) if case.list_input else tuple(out)


def output_grid(q: QuantModule):
    """The quantizer whose encoding the output is on (the input's for max pools)."""
    return q.output_quantizers[0] or q.input_quantizers[0]


def codes_pair(q: QuantModule, case: Case, args: Args) -> tuple[torch.Tensor, QTensor]:
    """(codes of the fake-quant forward's output, quantized_forward's QTensor) for the same
    inputs. Fake quant, not eval mode's integer path: it is what training computes."""
    with torch.no_grad(), qnn.fake_quant_eval():
        expected = output_grid(q).quantize(q(*args)).codes
        got = q.quantized_forward(*quantize_inputs(q, case, args))
    return expected, got


def cases_with_params() -> list[Case]:
    return [c for c in CASES if c.params]
