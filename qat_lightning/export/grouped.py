"""`convert` for per-group weights and dynamic activations.

- `GroupedIntegerLinear`: a Linear whose weight is per group, or whose input encoding is
  dynamic, with quantized activations. It stores the weight as codes (4 bits and fewer packed
  two per byte) with its group scales, keeps the float bias, and runs `nn.grouped.grouped_linear`
  exactly as the QAT model's eval-mode integer simulation does (bit for bit). ONNX:
  ``MatMulInteger`` on the input's codes (a dynamic encoding computed in the graph with our
  own formula) and the weight's, scaled in float (`export.integer_matmul`).
- Any other layer with a dynamic input encoding (a Conv, an add, ...) has no integer
  simulation here: it is converted to a fake-quant `QuantizedOp`, with a warning naming it;
  in ONNX its dynamic fake quantization is float ops (`export.onnx_dynamic`).

- `MatMulNBitsLinear`: a weight-only (``inputs=None``) per-group Linear. Eager: the float op
  on the dequantized weight (as `WeightOnlyLayer`). ONNX: onnxruntime's ``MatMulNBits``
  (com.microsoft) with the codes packed as it expects (``block_size`` = the group size), so
  onnxruntime runs its int4 / int8 kernels.

- `GroupedEmbedding`: a per-group embedding table; eager as `IntegerEmbedding`, ONNX as a
  blocked ``DequantizeLinear`` (opset 21: ``axis=1``, ``block_size`` = the group size) of the
  integer table, then ``Gather``.

Other weight-only layers are `WeightOnlyLayer`s whatever their weight granularity. What has
no ONNX form (`check_exportable`: a MatMulNBits group size that is not a power of two >= 16,
codes wider than 8 bits for MatMulInteger, a per-group quantizer on another layer) is
refused by `export_onnx` with one `ExportError` naming the layer, the value and what is
allowed. The native artifact writes every converted layer (per-block and dynamic entries in
``encodings.json``, see `export.encoding_entries`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qat_lightning.export._files import ExportError
from qat_lightning.export.integer_matmul import (
    CONSTANT_NAMES,
    integer_matmul_constants,
    integer_matmul_problem,
    onnx_integer_linear,
)
from qat_lightning.export.modules import (
    IntegerEmbedding,
    IntegerLayer,
    WeightOnlyLayer,
    freeze,
    weightless_twin,
)
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.qdq import onnx_int4, packs_to_int4
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.grouped import grouped_linear, uses_grouped_path
from qat_lightning.nn.integer_eval import exact_arithmetic
from qat_lightning.quant import Quantizer


def _active(quantizer: Quantizer | None) -> bool:
    return quantizer is not None and bool(quantizer.fake_quant_enabled)


class GroupedIntegerLinear(IntegerLayer):
    """A Linear with per-group (or per-channel) integer weights and a static or dynamic
    input encoding; see the module docstring. ``float_bias`` is the float bias."""

    @classmethod
    def from_quant(
        cls, source: QuantModule, borrowed: Quantizer | None = None
    ) -> GroupedIntegerLinear:
        weight, bias = source.weight_and_bias()
        w_quantizer = source.param_quantizers["weight"]
        scheme = w_quantizer.scheme.replace(learnable=False)
        relu = source.output_relu
        layer = cls(weightless_twin(source), type(source), scheme, tuple(weight.shape), relu)
        layer.input_quantizers[0] = freeze(source.input_quantizers[0], input_side=True)
        if layer.input_quantizers[0] is None:
            layer.borrowed_encodings[0] = freeze(borrowed)
        layer.output_quantizers[0] = freeze(source.output_quantizers[0])
        layer.store_weight(w_quantizer, weight)
        layer.store_float_bias(bias)
        return layer.to(weight.device)

    def onnx_problem(self) -> str | None:
        """Why this layer has no ``MatMulInteger`` form, or None."""
        return integer_matmul_problem(self.weight_scheme, self.input_encoding(0))

    def prepare_onnx(self, int4: bool, weights: str = "exact") -> None:
        self._onnx_int4 = int4 and packs_to_int4(self.weight_scheme)
        for name, value in integer_matmul_constants(self.weight_qtensor()).items():
            self.register_buffer(name, value, persistent=False)

    def finish_onnx(self) -> None:
        for name in CONSTANT_NAMES:
            self._buffers.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            constants = {name: self._buffers[name] for name in CONSTANT_NAMES}
            grouped = self.weight_scheme.per_group
            y = onnx_integer_linear(
                x, self.input_encoding(0), constants, self.float_bias, grouped, self._onnx_int4
            )
            y = torch.relu(y) if self.relu else y
            out = self.output_quantizers[0]
            return y if out is None else out(y)
        with exact_arithmetic(x.device):
            q_in = self.input_encoding(0).quantize(x)
            y = grouped_linear(q_in, self.weight_qtensor(), self.float_bias)
            if self.relu:
                y = torch.relu(y)
            out = self.output_quantizers[0]
            return y if out is None else out.quantize(y).dequantize()

    def extra_repr(self) -> str:
        source = self.input_encoding(0)
        kind = "dynamic " if source is not None and source.scheme.dynamic else ""
        s = self.weight_scheme
        weight = f"W{s.bits}" + (f" g{s.group_size}" if s.per_group else "")
        return f"{self.op.extra_repr()}, {weight}, {kind}A{source.scheme.bits if source else '?'}"


class MatMulNBitsLinear(WeightOnlyLayer):
    """A weight-only per-group Linear; eager as `WeightOnlyLayer`, ONNX as ``MatMulNBits``.

    ``MatMulNBits`` takes unsigned codes: 4-bit (and narrower) codes are stored as ``c + 8``
    two per byte (low nibble first), 5- to 8-bit ones as ``c + 128``; their zero points
    likewise (left out for a symmetric signed scheme: onnxruntime's default, 8 or 128, is
    exactly the offset). The group size must be a power of two >= 16 (`onnx_problem`).
    """

    @property
    def onnx_bits(self) -> int:
        return 4 if self.weight_scheme.bits <= 4 else 8

    def onnx_problem(self) -> str | None:
        """Why this layer has no ``MatMulNBits`` form, or None."""
        s = self.weight_scheme
        size = s.group_size
        if s.bits > 8:
            return f"weight bits={s.bits}: MatMulNBits takes 8-bit codes; allowed bits <= 8"
        if size < 16 or size & (size - 1):
            return (
                f"weight group_size={size}: MatMulNBits needs a block_size that is a power "
                "of two >= 16; allowed group_size 16, 32, 64, 128, ..."
            )
        return None

    def _offset_codes(self, codes: torch.Tensor) -> torch.Tensor:
        offset = 0 if not self.weight_scheme.signed else (8 if self.onnx_bits == 4 else 128)
        return (codes.to(torch.int16) + offset).to(torch.uint8)

    def _pack(self, u: torch.Tensor) -> torch.Tensor:
        """``(N, blocks, n)`` uint8 codes -> ``(N, blocks, n * bits / 8)`` bytes."""
        if self.onnx_bits == 8:
            return u.contiguous()
        if u.shape[-1] % 2:
            u = torch.cat([u, u.new_zeros(*u.shape[:-1], 1)], dim=-1)
        return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()

    def prepare_onnx(self, int4: bool, weights: str = "exact") -> None:
        out_features, in_features = self.weight_shape
        blocks = in_features // self.weight_scheme.group_size
        codes = self._offset_codes(self.weight_int_codes()).reshape(out_features, blocks, -1)
        self.register_buffer("mnb_weight", self._pack(codes), persistent=False)
        self.register_buffer("mnb_scales", self.weight_scale.float().clone(), persistent=False)
        zero_points = None
        if not (self.weight_scheme.symmetric and self.weight_scheme.signed):
            zp = self._offset_codes(self.weight_zero_point).reshape(out_features, 1, blocks)
            zero_points = self._pack(zp).reshape(out_features, -1)
        self.register_buffer("mnb_zero_points", zero_points, persistent=False)

    def finish_onnx(self) -> None:
        for name in ("mnb_weight", "mnb_scales", "mnb_zero_points"):
            self._buffers.pop(name, None)

    def forward(self, x: torch.Tensor, *extra) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x, *extra)
        out_features, in_features = self.weight_shape
        bias = None if self.float_bias is None else self.float_bias.to(x.dtype)
        y = torch.onnx.ops.symbolic(
            "com.microsoft::MatMulNBits",
            [x, self.mnb_weight, self.mnb_scales.to(x.dtype), self.mnb_zero_points, None, bias],
            {
                "K": in_features,
                "N": out_features,
                "bits": self.onnx_bits,
                "block_size": self.weight_scheme.group_size,
            },
            dtype=x.dtype,
            shape=(*x.shape[:-1], out_features),
        )
        return torch.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        s = self.weight_scheme
        return f"{super().extra_repr()}, g{s.group_size} (ONNX: MatMulNBits)"


class GroupedEmbedding(IntegerEmbedding):
    """A per-group embedding table (see the module docstring)."""

    def onnx_weight(self) -> torch.Tensor:
        if "weight" not in self._buffers:
            raise RuntimeError(f"{type(self).__name__}: export with qat_lightning.export_onnx")
        codes, scheme = self._buffers["weight"], self.weight_scheme
        zero_point = self.weight_zero_point.to(codes.dtype)
        if self._onnx_int4:
            codes, zero_point = (
                onnx_int4(codes, scheme.signed),
                onnx_int4(zero_point, scheme.signed),
            )
        return torch.onnx.ops.symbolic(
            "DequantizeLinear",
            [codes, self.weight_scale.float(), zero_point],
            {"axis": 1, "block_size": scheme.group_size},
            dtype=torch.float32,
            shape=codes.shape,
        )


def convert_grouped(
    name: str, module: QuantModule, borrowed: list[Quantizer | None]
) -> nn.Module | None:
    """The converted form of ``module`` if it is per-group or dynamic with quantized
    activations (see the module docstring); None where `convert`'s usual forms apply."""
    from qat_lightning.nn.embedding import QuantEmbedding
    from qat_lightning.nn.linear import QuantLinear

    sources = [
        own if _active(own) else b for own, b in zip(module.input_quantizers, borrowed, strict=True)
    ]
    dynamic = any(s is not None and s.scheme.dynamic for s in sources)
    weight_q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None  # noqa: SIM401
    grouped = _active(weight_q) and weight_q.scheme.per_group
    weight_only = all(s is None for s in sources) and not _active(module.output_quantizers[0])
    if grouped and weight_only and isinstance(module, QuantLinear):
        return MatMulNBitsLinear.from_quant(module)
    if grouped and isinstance(module, QuantEmbedding) and module.max_norm is None:
        return GroupedEmbedding.from_quant(module)
    if not (dynamic or grouped) or all(s is None for s in sources):
        return None  # other weight-only layers and every static layer: the usual forms
    linear = isinstance(module, QuantLinear) and _active(weight_q)
    if linear and sources[0] is not None and (uses_grouped_path(module) or dynamic):
        return GroupedIntegerLinear.from_quant(module, borrowed[0])
    op = QuantizedOp(module, borrowed)
    op.integer_mode.fill_(0)
    reason = "its input encoding is dynamic" if dynamic else "its weight is per group"
    warnings.warn(
        f"convert: layer {name!r} ({type(module).__name__}) runs in fake quant (float "
        f"arithmetic): {reason}, which only Linear layers simulate with integers",
        stacklevel=3,
    )
    return op


def _onnx_problem(module: nn.Module) -> str | None:
    """Why ``module`` (of a converted model) has no ONNX form, or None."""
    if isinstance(module, (MatMulNBitsLinear, GroupedIntegerLinear)):
        return module.onnx_problem()
    if isinstance(module, QuantizedOp):
        for role, quantizer in (
            *(("input", q) for q in module.input_quantizers),
            *(("output", q) for q in module.module.output_quantizers),
            *((f"param {k!r}", q) for k, q in module.module.param_quantizers.items()),
        ):
            if quantizer is not None and quantizer.scheme.per_group:
                return (
                    f"its {role} quantizer has granularity='per_group' (group_size="
                    f"{quantizer.scheme.group_size}), which only Linear (MatMulNBits, "
                    "MatMulInteger) and Embedding tables export as; allowed per_tensor or "
                    "per_channel here (an override for this layer)"
                )
    return None


def check_exportable(model: nn.Module, writer: str) -> None:
    """Raise `ExportError` naming ``writer``, the layer, the scheme value and what is
    allowed, for a layer of a converted model that ``writer`` cannot write (ONNX only: the
    native artifact writes every converted layer)."""
    if writer != "export_onnx":
        return
    for name, module in model.named_modules():
        problem = _onnx_problem(module)
        if problem is not None:
            raise ExportError(
                f"{writer}: layer {name!r} ({type(module).__name__}) cannot be written: {problem}"
            )
