"""Quantized ``a + b``, ``a * b``, ``torch.cat`` and ``a @ b``, so residual adds, gates,
concatenations and attention products are quantized too.

torch.nn has no module for these, so this file gives each a small float module (`Add`, `Mul`,
`Cat`, `MatMul`, in the spirit of torch.ao's ``FloatFunctional``) that a model may use directly
and that surgery swaps through the registry like any layer; surgery that rewrites a traced
``operator.add`` builds the quantized module from a scheme with ``QuantAdd.create(inputs)``.

Each quantized module has one input quantizer per input and one output quantizer. Integer mode:
Add and Cat dequantize their inputs exactly (float64), combine, and quantize to the output
encoding (an integer runtime rescales each input to the output grid: the same codes); Mul and
MatMul multiply centered codes exactly (float64) at scale ``s_a * s_b`` and requantize.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.eval_cache import quantize_owned
from qat_lightning.nn.integer import accumulate_to_qtensor
from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor, QuantScheme


class Add(nn.Module):
    """``a + b`` as a module."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    """``a * b`` (broadcasting) as a module."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Cat(nn.Module):
    """``torch.cat(tensors, dim)`` of a fixed number of tensors, as a module.

    Args:
        dim: the dimension to concatenate along.
        num_inputs: how many tensors it joins (the quantized twin has one input quantizer each).
    """

    def __init__(self, dim: int = 0, num_inputs: int = 2) -> None:
        super().__init__()
        if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
            raise ValueError(f"Cat.num_inputs={num_inputs!r} is invalid: allowed an integer >= 1")
        self.dim = dim
        self.num_inputs = num_inputs

    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._check(tensors), dim=self.dim)

    def _check(self, tensors: Sequence[Any]) -> Sequence[Any]:
        if len(tensors) != self.num_inputs:
            raise ValueError(
                f"{type(self).__name__}: got {len(tensors)} tensors; allowed exactly "
                f"num_inputs={self.num_inputs}"
            )
        return tensors

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_inputs={self.num_inputs}"


class _QuantElementwise(QuantModule):
    """Shared construction: an activation scheme, no parameters."""

    _num_inputs = 2

    def __init__(self, inputs: QuantScheme | dict[str, Any] | None) -> None:
        nn.Module.__init__(self)
        self._init_quantizers(QuantScheme.from_any(inputs), None)

    @classmethod
    def create(
        cls,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> QuantModule:
        """Build from the activation scheme (``params`` is accepted for a uniform call and
        ignored: these modules have no parameters).

        Example:
            >>> add = QuantAdd.create({"bits": 8, "symmetric": False, "signed": False})
        """
        return cls(inputs, **kwargs)

    def _quantize_value(self, value: torch.Tensor) -> QTensor:
        out = self.output_quantizers[0]
        if out is None:
            raise ValueError(
                f"{type(self).__name__}: integer mode needs an output quantizer to put the "
                "result on a grid"
            )
        return quantize_owned(out, value.float())


def _exact(q: QTensor) -> torch.Tensor:
    """The value of ``q`` in float64: integer code times float32 scale is exact there (one new
    tensor, then in place)."""
    scale, zp = q.broadcast_encoding()
    return q.codes.double().sub_(zp.double().round()).mul_(scale.double())


_SLICE_ELEMENTS = 2**16  # rows of about this many elements: 512 KiB of float64


def _rows(q: QTensor, start: int, step: int) -> QTensor:
    """Rows ``start:start + step`` of a per-tensor ``q``."""
    return QTensor(q.codes[start : start + step], q.scale, q.zero_point, q.scheme)


def _per_tensor(module: QuantModule, *qs: QTensor) -> None:
    if any(q.scale.dim() > 0 for q in qs):
        raise ValueError(
            f"{type(module).__name__}: integer mode needs per-tensor input scales; got a "
            "per-channel input"
        )


@register_quant_module(Add)
class QuantAdd(_QuantElementwise, Add):
    """``a + b`` with both inputs and the sum fake-quantized.

    With ``fused_relu`` it computes ``relu(a + b)`` before its output quantizer, as a residual
    block's add-then-ReLU: one quantized tensor instead of two, the whole output range for the
    values ReLU keeps, and an ``Add -> Relu -> Q`` that onnxruntime runs as one ``QLinearAdd``.
    """

    fused_relu = False  # also the default for from_float, which does not call __init__

    def __init__(self, inputs: QuantScheme | dict[str, Any] | None, fused_relu: bool = False):
        super().__init__(inputs)
        self.fused_relu = fused_relu

    @property
    def output_relu(self) -> bool:
        return self.fused_relu

    @integer_in_eval
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.fq_input(a, 0) + self.fq_input(b, 1)
        return self.fq_output_after_relu(y) if self.fused_relu else self.fq_output(y)

    def quantized_forward(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = self.input_qtensor(a, 0), self.input_qtensor(b, 1)
        out = self.output_quantizers[0]
        per_tensor = all(q.scale.dim() == 0 and q.zero_point.dim() == 0 for q in (a, b))
        if out is None or not per_tensor or a.shape != b.shape or a.codes.dim() == 0:
            return self._add(a, b)
        # In slices along the first axis: the float64 temporaries of a whole activation are
        # fresh memory every call, and filling fresh pages costs more than the arithmetic.
        step = max(1, _SLICE_ELEMENTS // max(1, a.codes[0].numel()))
        parts = [
            self._add(_rows(a, i, step), _rows(b, i, step)) for i in range(0, a.shape[0], step)
        ]
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        codes = torch.cat([p.codes for p in parts])
        return QTensor(codes, first.scale, first.zero_point, first.scheme)

    def _add(self, a: QTensor, b: QTensor) -> QTensor:
        y = _exact(a).add_(_exact(b))
        return self._quantize_value(y.clamp_(min=0) if self.fused_relu else y)

    def extra_repr(self) -> str:
        return "fused_relu=True" if self.fused_relu else ""


@register_quant_module(Mul)
class QuantMul(_QuantElementwise, Mul):
    """``a * b`` with both inputs and the product fake-quantized."""

    @integer_in_eval
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fq_output(self.fq_input(a, 0) * self.fq_input(b, 1))

    def quantized_forward(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = self.input_qtensor(a, 0), self.input_qtensor(b, 1)
        _per_tensor(self, a, b)
        acc = a.centered(torch.int64).double() * b.centered(torch.int64).double()
        acc_scale = a.scale.double() * b.scale.double()
        return accumulate_to_qtensor(acc, acc_scale, self.output_quantizers[0])


@register_quant_module(MatMul)
class QuantMatMul(_QuantElementwise, MatMul):
    """``torch.matmul(a, b)`` with both inputs and the product fake-quantized."""

    @integer_in_eval
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fq_output(torch.matmul(self.fq_input(a, 0), self.fq_input(b, 1)))

    def quantized_forward(self, a: QTensor, b: QTensor) -> QTensor:
        a, b = self.input_qtensor(a, 0), self.input_qtensor(b, 1)
        _per_tensor(self, a, b)
        # Exact below 2**53: K * qmax_a * qmax_b, e.g. K < 2**37 at 8 bits.
        acc = torch.matmul(a.centered(torch.int64).double(), b.centered(torch.int64).double())
        acc_scale = a.scale.double() * b.scale.double()
        return accumulate_to_qtensor(acc, acc_scale, self.output_quantizers[0])


@register_quant_module(Cat)
class QuantCat(_QuantElementwise, Cat):
    """``torch.cat`` of ``num_inputs`` tensors, each input and the result fake-quantized.

    Args:
        inputs: the activation scheme.
        dim: the dimension to concatenate along.
        num_inputs: how many tensors ``forward`` takes (one input quantizer each).
    """

    def __init__(
        self,
        inputs: QuantScheme | dict[str, Any] | None,
        dim: int = 0,
        num_inputs: int = 2,
    ) -> None:
        Cat.__init__(self, dim, num_inputs)
        self._init_quantizers(QuantScheme.from_any(inputs), None)

    @property
    def _num_inputs(self) -> int:  # sizes input_quantizers at construction
        return self.num_inputs

    @integer_in_eval
    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        tensors = self._check(tensors)
        return self.fq_output(
            torch.cat([self.fq_input(t, i) for i, t in enumerate(tensors)], dim=self.dim)
        )

    def quantized_forward(self, tensors: Sequence[QTensor]) -> QTensor:
        tensors = self._check(tensors)
        values = [_exact(self.input_qtensor(q, i)) for i, q in enumerate(tensors)]
        return self._quantize_value(torch.cat(values, dim=self.dim))
