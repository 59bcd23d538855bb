"""The modules of a converted model: integer weights, fixed encodings, integer forward.

- `IntegerLayer`: a Linear / Conv / ConvTranspose (BN already folded) whose weight is stored
  as integer codes (int8; 4-bit and narrower packed two per byte; wider in int16/int32) with
  its scale and zero point, and whose bias is int32 at ``s_in * s_w``.
- `IntegerEmbedding`: an embedding table stored as codes.
- `QuantizedOp` (in `ops`): any other quantized module (add, pools, activations, cat, ...),
  kept as it is with its quantizers frozen.

Every one of them runs the integer simulation in eager mode: it quantizes its float input
(with its own input encoding, or, when it has none because the producer owns that tensor's
encoding, with a frozen copy of the producer's: on-grid floats re-quantize to the same codes),
computes on codes, and returns the dequantized result. Under ``torch.onnx.export`` the same
module is a QDQ float graph: ``DequantizeLinear`` of the integer initializers, the float op,
``QuantizeLinear``/``DequantizeLinear`` where a quantizer owns a tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.export.qdq import (
    FrozenQuantizer,
    on_grid_for_onnx,
    onnx_bias_scale,
    onnx_container,
    onnx_dequantize,
    onnx_int4,
    pack_int4,
    packs_to_int4,
    qdq_or_identity,
    relu_then_qdq,
    unpack_int4,
    zero_point_is_qmin,
)
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.grouped import table_values
from qat_lightning.nn.integer import accumulator_scale, integer_mac, quantize_bias
from qat_lightning.nn.integer_eval import exact_arithmetic
from qat_lightning.quant import QTensor, Quantizer, QuantScheme


def freeze(quantizer: Quantizer | None, input_side: bool = False) -> FrozenQuantizer | None:
    """A frozen copy of an active quantizer; None for none or one with fake quant off."""
    if quantizer is None or not bool(quantizer.fake_quant_enabled):
        return None
    return FrozenQuantizer.from_quantizer(quantizer, input_side=input_side)


def float_type_of(module: nn.Module) -> type[nn.Module]:
    """The float type a quantized module is the twin of (the first non-quantized module class
    in its MRO: ``nn.Conv2d`` for ``QuantConvBn2d``, a user's class for a user's family)."""
    return next(
        b
        for b in type(module).__mro__[1:]
        if issubclass(b, nn.Module) and not issubclass(b, QuantModule)
    )


def weightless_twin(module: nn.Module) -> nn.Module:
    """The float twin of a quantized layer with only its hyperparameters (no tensors, no
    submodules): the family's ``mac_op`` reads them from it, with explicit weights."""
    float_type = float_type_of(module)
    twin = float_type.__new__(float_type)
    nn.Module.__init__(twin)
    skip = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
    skip += ("_input_sources", "_no_integer_form")  # (quantized-module state, not hyperparameters)
    twin.__dict__.update({k: v for k, v in module.__dict__.items() if k not in skip})
    twin._parameters = dict.fromkeys(module._parameters)
    twin.training = False
    return twin


class _Converted(nn.Module):
    """Shared input handling: own input quantizers, borrowed producer encodings."""

    input_quantizers: nn.ModuleList
    borrowed_encodings: nn.ModuleList

    def input_encoding(self, index: int = 0) -> FrozenQuantizer | None:
        """The encoding that turns input ``index`` into codes (own, else the producer's)."""
        own = self.input_quantizers[index] if index < len(self.input_quantizers) else None
        if own is not None:
            return own
        return self.borrowed_encodings[index] if index < len(self.borrowed_encodings) else None


class _IntegerWeights(_Converted):
    """Shared by layers whose weight is stored as codes: ``weight_codes`` (packed nibbles for
    4 bits and fewer), ``weight_scale``, ``weight_zero_point``; ``weight_scheme`` and
    ``weight_shape`` describe them."""

    weight_scheme: QuantScheme
    weight_shape: tuple[int, ...]
    _onnx_int4 = False
    _onnx_offset = 0  # added to codes and zero point in the ONNX initializer (see IntegerLayer)

    def store_weight(self, w_quantizer: Quantizer, weight: torch.Tensor) -> None:
        """Register ``weight``'s integer codes (int4 packed two per byte), scale and zero point."""
        q_w = w_quantizer.quantize(weight.detach().float())
        codes = pack_int4(q_w.codes) if packs_to_int4(self.weight_scheme) else q_w.codes
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", q_w.scale.clone())
        self.register_buffer("weight_zero_point", q_w.zero_point.clone())

    def weight_int_codes(self) -> torch.Tensor:
        """The weight codes, unpacked, in their shape."""
        if packs_to_int4(self.weight_scheme):
            return unpack_int4(self.weight_codes, self.weight_shape, self.weight_scheme.signed)
        return self.weight_codes

    def weight_qtensor(self) -> QTensor:
        return QTensor(
            self.weight_int_codes(), self.weight_scale, self.weight_zero_point, self.weight_scheme
        )

    def prepare_onnx(self, int4: bool, weights: str = "exact") -> None:
        """Set the export-time constants (called by `export_onnx` before tracing): the
        unpacked codes become a temporary buffer ``weight``, the ONNX initializer.
        ``weights``: `export_onnx`'s (a layer with a MAC reads it)."""
        self._onnx_int4 = int4 and packs_to_int4(self.weight_scheme)
        codes = self.weight_int_codes().to(onnx_container(self.weight_scheme))
        if self._onnx_offset:
            codes = (codes.to(torch.int16) + self._onnx_offset).to(torch.uint8)
        self.register_buffer("weight", codes, persistent=False)

    def finish_onnx(self) -> None:
        self._buffers.pop("weight", None)

    def onnx_weight(self) -> torch.Tensor:
        """``DequantizeLinear`` of the integer weight initializer (export only)."""
        if "weight" not in self._buffers:
            raise RuntimeError(f"{type(self).__name__}: export with qat_lightning.export_onnx")
        codes, scheme = self._buffers["weight"], self.weight_scheme
        # The zero point stays even when it is 0: onnxruntime's QDQ fusion needs it there.
        zero_point = (self.weight_zero_point + self._onnx_offset).to(codes.dtype)
        if self._onnx_int4:
            codes, zero_point = (
                onnx_int4(codes, scheme.signed),
                onnx_int4(zero_point, scheme.signed),
            )
        per_channel = self.weight_scale.dim() > 0
        axis = scheme.axis % len(self.weight_shape) if per_channel else None
        return onnx_dequantize(codes, self.weight_scale, zero_point, axis)


class IntegerLayer(_IntegerWeights):
    """A multiply-accumulate layer with integer weights; see the module docstring.

    Built by `from_quant` from any calibrated MAC layer (``convert_as == "mac"``: Linear, Conv,
    fused ConvBn, ConvTranspose, a user's `QuantMAC` family), whose class it keeps as
    ``family`` and asks for the op (``mac_op``) in eager mode and in ONNX alike.
    ``weight_codes`` is a buffer of codes (packed nibbles for 4 bits and fewer),
    ``weight_scale`` / ``weight_zero_point`` its encoding, ``bias_codes`` the int32 bias at
    the accumulator scale.
    """

    def __init__(
        self,
        op: nn.Module,
        family: type[QuantModule],
        weight_scheme: QuantScheme,
        weight_shape: tuple[int, ...],
        relu: bool,
    ) -> None:
        super().__init__()
        self.op = op
        self.family = family  # the quantized class: its mac_op and MAC attributes
        self.weight_scheme = weight_scheme
        self.weight_shape = tuple(weight_shape)
        self.relu = relu
        self.input_quantizers = nn.ModuleList([None])
        self.borrowed_encodings = nn.ModuleList([None])
        self.output_quantizers = nn.ModuleList([None])
        self._onnx_relu_is_clamp = False

    @classmethod
    def from_quant(cls, source: QuantModule, borrowed: Quantizer | None) -> IntegerLayer:
        """Convert ``source`` (eval-mode, calibrated); ``borrowed`` is the producer's output
        quantizer when ``source`` has no input quantizer of its own."""
        weight, bias = source.weight_and_bias()
        w_quantizer = source.param_quantizers["weight"]
        layer = cls(
            weightless_twin(source),
            type(source),
            w_quantizer.scheme.replace(learnable=False),
            tuple(weight.shape),
            source.output_relu,
        )
        layer.input_quantizers[0] = freeze(source.input_quantizers[0], input_side=True)
        if layer.input_quantizers[0] is None:
            layer.borrowed_encodings[0] = freeze(borrowed)
        layer.output_quantizers[0] = freeze(source.output_quantizers[0])
        layer.store_weight(w_quantizer, weight)
        acc_scale = layer.accumulator_scale()
        bias_codes = quantize_bias(bias, acc_scale)
        layer.register_buffer(
            "bias_codes", None if bias_codes is None else bias_codes.to(torch.int32)
        )
        return layer.to(weight.device)

    def store_float_bias(self, bias: torch.Tensor | None) -> None:
        """For the layers whose bias stays float (weight-only, per group, dynamic inputs): no
        int32 ``bias_codes``, the bias as ``float_bias``."""
        self.register_buffer("bias_codes", None)
        self.register_buffer("float_bias", None if bias is None else bias.detach().clone())

    # -- tensors --------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The layer family (its quantized class's name), as printed."""
        return self.family.__name__

    def accumulator_scale(self) -> torch.Tensor:
        """``s_in * s_w`` (float64), 0-d or per output channel."""
        encoding = self.input_encoding(0)
        if encoding is None:
            raise ValueError("IntegerLayer: no input encoding (own or the producer's)")
        return accumulator_scale(self.family, self.op, encoding.scale, self.weight_scale)

    def _mac(self, x, w, b, extra: tuple[Any, ...]) -> torch.Tensor:
        return self.family.mac_op(self.op, x, w, b, *extra)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *extra: Any) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._onnx_forward(x, extra)
        with exact_arithmetic(x.device):
            return self._integer_forward(x, extra)

    def _integer_forward(self, x: torch.Tensor, extra: tuple[Any, ...]) -> torch.Tensor:
        """`integer_mac`, the integer MAC the QAT layer's eval mode runs, on stored codes."""
        q_in = self.input_encoding(0).quantize(x)
        out = integer_mac(
            self.family,
            self.op,
            q_in,
            self.weight_qtensor(),
            self.bias_codes,
            self.output_quantizers[0],
            extra,
            self.relu,
        )
        return out.dequantize()

    def prepare_onnx(self, int4: bool, weights: str = "exact") -> None:
        unsigned = weights == "exact" and self._needs_unsigned_weights(int4)
        self._onnx_offset = 128 if unsigned else 0
        super().prepare_onnx(int4)
        self._onnx_relu_is_clamp = zero_point_is_qmin(self.output_quantizers[0])

    def _needs_unsigned_weights(self, int4: bool) -> bool:
        """True if 8-bit signed weights meet 8-bit activations (uint8 in ONNX): they are then
        stored as uint8 too (codes and zero point + 128, the same real values).

        Why: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI (AVX2, e.g. AMD EPYC)
        multiply with ``vpmaddubsw``, which saturates the sum of two products at int16; with
        weight codes beyond +-64 the result is then not the exact integer convolution (up to 3
        output steps off on a small CNN, in 57 % of outputs). Its u8 x u8 kernels widen first
        and are exact everywhere, and still fuse into QLinearConv / QGemm.
        """
        encoding = self.input_encoding(0)
        scheme = self.weight_scheme
        if encoding is None or encoding.scheme.bits > 8:
            return False
        if (int4 and packs_to_int4(scheme)) or not scheme.signed or scheme.bits > 8:
            return False
        codes = self.weight_int_codes()
        return bool(codes.numel()) and int(codes.abs().max()) > 64

    def _onnx_forward(self, x: torch.Tensor, extra: tuple[Any, ...]) -> torch.Tensor:
        own = self.input_quantizers[0]
        x = own(x) if own is not None else on_grid_for_onnx(self.borrowed_encodings[0], x)
        weight = self.onnx_weight()
        bias = None
        if self.bias_codes is not None:  # int32 at s_in * s_w, zero point 0 (left out)
            acc_scale = self.accumulator_scale().float()
            bias_axis = 0 if acc_scale.dim() > 0 else None
            if acc_scale.shape == self.weight_scale.shape:  # (not a grouped transposed conv)
                acc_scale = onnx_bias_scale(self.input_encoding(0).scale, self.weight_scale)
            bias = onnx_dequantize(self.bias_codes, acc_scale, None, bias_axis)
        y = self._mac(x, weight, bias, extra)
        if self.relu:
            return relu_then_qdq(self.output_quantizers[0], y, self._onnx_relu_is_clamp)
        return qdq_or_identity(self.output_quantizers[0], y)

    def extra_repr(self) -> str:
        op = self.op.extra_repr().replace(", bias=False", "")
        bias = ", int32 bias" if self.bias_codes is not None else ""
        return f"{self.kind}: {op}, W{self.weight_scheme.bits}{bias}{', relu' if self.relu else ''}"


class WeightOnlyLayer(IntegerLayer):
    """A weight-only quantized layer (``inputs=None``): integer weight codes, float input,
    float bias, float output. Eager: ``op(x, dequantize(codes), bias)``; ONNX:
    ``DequantizeLinear`` of the integer weight initializer feeding the float Gemm / Conv."""

    @classmethod
    def from_quant(cls, source: QuantModule, borrowed: Quantizer | None = None) -> WeightOnlyLayer:
        """Convert ``source``, a layer with a quantized weight and no activation encodings."""
        weight, bias = source.weight_and_bias()
        w_quantizer = source.param_quantizers["weight"]
        scheme = w_quantizer.scheme.replace(learnable=False)
        layer = cls(
            weightless_twin(source), type(source), scheme, tuple(weight.shape), source.output_relu
        )
        layer.store_weight(w_quantizer, weight)
        layer.store_float_bias(bias)
        return layer.to(weight.device)

    def forward(self, x: torch.Tensor, *extra: Any) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            weight = self.onnx_weight()
        else:
            weight = self.weight_qtensor().dequantize().to(x.dtype)
        y = self._mac(x, weight, self.float_bias, extra)
        return F.relu(y) if self.relu else y

    def prepare_onnx(self, int4: bool, weights: str = "exact") -> None:
        _IntegerWeights.prepare_onnx(self, int4)

    def extra_repr(self) -> str:
        op = self.op.extra_repr().replace(", bias=False", "")
        relu = ", relu" if self.relu else ""
        return (
            f"{self.kind}: {op}, W{self.weight_scheme.bits} weight-only (float activations){relu}"
        )


class IntegerEmbedding(_IntegerWeights):
    """An embedding table stored as integer codes; rows are looked up by integer indices."""

    def __init__(self, op: nn.Module, weight_scheme: QuantScheme, weight_shape) -> None:
        super().__init__()
        self.op = op
        self.weight_scheme = weight_scheme
        self.weight_shape = tuple(weight_shape)
        self.input_quantizers = nn.ModuleList([None])
        self.borrowed_encodings = nn.ModuleList([None])
        self.output_quantizers = nn.ModuleList([None])

    @classmethod
    def from_quant(cls, source: QuantModule) -> IntegerEmbedding:
        w_quantizer = source.param_quantizers["weight"]
        weight = source.weight.detach().float()
        table = cls(
            weightless_twin(source), w_quantizer.scheme.replace(learnable=False), weight.shape
        )
        table.output_quantizers[0] = freeze(source.output_quantizers[0])
        table.store_weight(w_quantizer, weight)
        return table.to(weight.device)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            table = self.onnx_weight()
            return qdq_or_identity(self.output_quantizers[0], F.embedding(indices, table))
        q_w = self.weight_qtensor()
        out = self.output_quantizers[0]
        if out is None:
            return table_values(q_w, indices)
        return out.quantize(F.embedding(indices, q_w.dequantize())).dequantize()

    def extra_repr(self) -> str:
        return f"{self.op.extra_repr()}, W{self.weight_scheme.bits}"
