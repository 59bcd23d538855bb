"""Fixed encodings after training, and how they appear in ONNX.

`FrozenQuantizer` is a `Quantizer` whose encoding no longer moves: in eager mode it is the same
fake quantization, under ``torch.onnx.export`` it becomes a ``QuantizeLinear`` /
``DequantizeLinear`` pair (``torch.onnx.ops.symbolic``), so a converted module's ordinary float
forward exports as a QDQ graph that onnxruntime fuses into integer kernels.

Codes travel in ONNX "containers": int8/uint8 up to 8 bits, int16/uint16 up to 16 bits, and
INT4/UINT4 (opset 21) for weights of 4 bits or fewer. 8-bit activations are always uint8 (a
signed scheme's codes and zero point + 128), see `activation_offset`. A range narrower than its
container (a 6-bit or a narrow-range scheme) is kept exact by a ``Clip`` on the codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qat_lightning.export.onnx_dynamic import onnx_dynamic_fake_quant
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.functional import channel_view, fake_quantize

# ONNX TensorProto data types the symbolic ops need beyond torch's own dtypes.
ONNX_UINT4, ONNX_INT4 = 21, 22


def onnx_container(scheme: QuantScheme) -> torch.dtype:
    """The torch dtype of the ONNX integer type that carries ``scheme``'s codes."""
    if scheme.bits <= 8:
        return torch.int8 if scheme.signed else torch.uint8
    return torch.int16 if scheme.signed else torch.uint16


def activation_offset(scheme: QuantScheme) -> int:
    """What ONNX adds to an activation's codes and zero point: 128 for signed 8-bit schemes,
    which travel as uint8 (the same real values), else 0.

    Why: onnxruntime's x86 kernels for int8 activations, and for uint8 activations with int8
    weights, multiply with ``vpmaddubsw`` on CPUs without VNNI (AVX2, e.g. AMD EPYC), which
    saturates the sum of two products at int16, so their results are not the exact integer
    convolution there (most outputs several steps off on a small CNN). Their uint8 x uint8
    kernels widen first and are exact on every CPU, and still fuse into QLinearConv / QGemm;
    weights meeting uint8 activations go to uint8 too (`IntegerLayer._onnx_offset`).
    """
    return 128 if scheme.signed and scheme.bits <= 8 else 0


def activation_container(scheme: QuantScheme) -> torch.dtype:
    """The torch dtype an activation's codes have in ONNX (see `activation_offset`)."""
    return torch.uint8 if scheme.bits <= 8 else onnx_container(scheme)


def fills_container(scheme: QuantScheme) -> bool:
    """True if ``[qmin, qmax]`` is the container's whole range (no clip needed)."""
    info = torch.iinfo(onnx_container(scheme))
    return scheme.qmin == info.min and scheme.qmax == info.max


def packs_to_int4(scheme: QuantScheme) -> bool:
    """Weights of this scheme are stored as 4-bit nibbles (two per byte)."""
    return scheme.bits <= 4


# -- 4-bit packing (the ONNX INT4 layout: element 2i in the low nibble) ----------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in ``[-8, 7]`` or ``[0, 15]`` packed two per byte into a flat uint8 tensor."""
    flat = codes.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: torch.Size, signed: bool) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 codes of ``shape``."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).to(torch.int8)
    if signed:
        nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    numel = 1
    for size in shape:
        numel *= int(size)
    return nibbles[:numel].reshape(shape)


# -- ONNX nodes ------------------------------------------------------------------------------
def _attrs(axis: int | None) -> dict[str, int]:
    return {} if axis is None else {"axis": axis}


def onnx_quantize(
    x, scale, zero_point, scheme: QuantScheme, axis: int | None = None, reciprocal: bool = False
):
    """``QuantizeLinear`` to ``scheme``'s container (+ ``Clip`` for a narrower range).

    ``reciprocal``: compute ``x * (1/scale)`` first and quantize with scale 1, which is how
    torch's kernels (and `Quantizer.quantize`) round; ``QuantizeLinear`` divides, which
    rounds differently once in a few million values. Used where arbitrary floats (the
    model's input) are quantized, so onnxruntime and the integer simulation agree bit for bit.
    """
    container, offset = activation_container(scheme), activation_offset(scheme)
    view = (lambda t: t) if axis is None else (lambda t: channel_view(t, x.dim(), axis))
    if container in (torch.int16, torch.uint16) and not fills_container(scheme):
        # ORT has no 16-bit integer Clip: clip the float value to the code range instead.
        lo = ((scheme.qmin - zero_point.double()) * scale.double()).float()
        hi = ((scheme.qmax - zero_point.double()) * scale.double()).float()
        x = torch.maximum(torch.minimum(x, view(hi)), view(lo))
    if reciprocal:
        x = x * view(1.0 / scale)
        scale = torch.ones_like(scale)
    q = torch.onnx.ops.symbolic(
        "QuantizeLinear",
        [x, scale, (zero_point + offset).to(container)],
        _attrs(axis),
        dtype=container,
        shape=x.shape,
    )
    if container == torch.uint8 and not fills_container(scheme):
        bounds = [torch.tensor(b + offset, dtype=container) for b in (scheme.qmin, scheme.qmax)]
        q = torch.onnx.ops.symbolic("Clip", [q, *bounds], dtype=container, shape=x.shape)
    return q


def onnx_dequantize(q, scale, zero_point=None, axis: int | None = None) -> torch.Tensor:
    """``DequantizeLinear`` to float32 (``zero_point`` must already have ``q``'s type; None
    for a zero point of 0)."""
    return torch.onnx.ops.symbolic(
        "DequantizeLinear",
        [q, scale] if zero_point is None else [q, scale, zero_point],
        _attrs(axis),
        dtype=torch.float32,
        shape=q.shape,
    )


# Marks nodes the exporter's constant folding must keep (read by `onnx._trace`).
KEEP_NODE = "qat_lightning.keep"


def onnx_bias_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``Mul(s_in, s_w)``: the int32 bias's scale, computed in the graph from the two scales
    the graph holds anyway instead of stored as one more per-channel initializer (4 bytes a
    channel: 3 % of a mobilenet_v2). onnxruntime folds it when it loads the model; float32
    multiplication rounds the exact product, as ``float32(s_in * s_w)`` in float64 does."""
    return torch.onnx.ops.symbolic(
        "Mul",
        [input_scale.float(), weight_scale.float()],
        dtype=torch.float32,
        shape=weight_scale.shape,
        metadata_props={KEEP_NODE: "bias scale"},
    )


def onnx_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """``Cast`` of int8 codes to INT4/UINT4; the exporter folds it into a 4-bit initializer."""
    to = ONNX_INT4 if signed else ONNX_UINT4
    return torch.onnx.ops.symbolic("Cast", [codes], {"to": to}, dtype=to, shape=codes.shape)


# -- the frozen quantizer ---------------------------------------------------------------------
class FrozenQuantizer(Quantizer):
    """A calibrated quantizer with a fixed encoding: fake quant eagerly, QDQ in ONNX export.

    Args:
        scheme: the scheme of the quantizer it freezes (made non-learnable).
        scale: float32 scale, 0-d or per channel.
        zero_point: integer zero point of the same shape.

    Example:
        >>> frozen = FrozenQuantizer.from_quantizer(module.output_quantizers[0])
    """

    def __init__(self, scheme: QuantScheme, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scheme = scheme.replace(learnable=False) if scheme.learnable else scheme
        super().__init__(scheme, num_channels=scale.numel() if scheme.per_channel else None)
        self.observer = None  # nothing is observed any more; keeps the state dict to the encoding
        self._set_encoding(scale.detach().float(), zero_point.detach().round().to(torch.int32))
        self.initialized.fill_(1)
        self.observer_enabled.fill_(0)
        self.fake_quant_enabled.fill_(1)
        # Set by convert for input quantizers: export with `onnx_quantize(reciprocal=True)`.
        self.onnx_reciprocal = False

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer, *, input_side: bool = False) -> FrozenQuantizer:
        """A frozen copy of ``quantizer``'s current encoding, on its device.

        ``input_side``: it quantizes a module's input, which may be any float (the model's
        input); its ONNX form then rounds exactly as torch does (see `onnx_quantize`).
        """
        scale, zero_point = quantizer.encoding()
        frozen = cls(quantizer.scheme, scale, zero_point).to(scale.device)
        frozen.onnx_reciprocal = input_side
        return frozen

    def update_encodings(self) -> None:
        """A frozen encoding never changes."""

    def compute_encodings(self):
        raise RuntimeError(
            "FrozenQuantizer: the encoding of a converted model is fixed; calibrate the QAT "
            "model before convert()"
        )

    def axis_for(self, ndim: int) -> int | None:
        """The channel axis for an ``ndim``-d tensor, or None for a per-tensor encoding."""
        if not self.scheme.per_channel or self.scale.dim() == 0:
            return None
        return self.scheme.axis % ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.scheme.dynamic:
            return onnx_dynamic_fake_quant(x, self.scheme)  # its encoding computed in the graph
        if torch.onnx.is_in_onnx_export():
            axis = self.axis_for(x.dim())
            q = onnx_quantize(
                x, self.scale, self.zero_point, self.scheme, axis, self.onnx_reciprocal
            )
            offset = activation_offset(self.scheme)
            zero_point = (self.zero_point + offset).to(activation_container(self.scheme))
            out = onnx_dequantize(q, self.scale, zero_point, axis)
            out._qat_dequantized = True  # see on_grid_for_onnx
            return out
        if self.scheme.dynamic:  # its encoding is each tensor's own
            return super().forward(x)
        return fake_quantize(x, self.scale, self.zero_point, self.scheme)


def on_grid_for_onnx(encoding: FrozenQuantizer | None, x: torch.Tensor) -> torch.Tensor:
    """In export, give a borrowed input its ``Q -> DQ`` unless it comes straight from one.

    The producer quantized the tensor; ops between it and this consumer that keep values on
    the grid (flatten, max pool, a float ReLU) hide that ``DequantizeLinear`` from the
    consumer, and onnxruntime then cannot fuse the consumer. Re-quantizing an on-grid tensor
    gives the same codes, so the extra pair changes nothing but the fusion.
    """
    if encoding is None or getattr(x, "_qat_dequantized", False):
        return x
    return encoding(x)


def qdq_or_identity(quantizer: FrozenQuantizer | None, x: torch.Tensor) -> torch.Tensor:
    """``quantizer(x)``, or ``x`` when there is no quantizer."""
    return x if quantizer is None else quantizer(x)


def relu_then_qdq(
    quantizer: FrozenQuantizer | None, y: torch.Tensor, relu_is_clamp: bool
) -> torch.Tensor:
    """``QDQ(relu(y))`` laid out so onnxruntime can still fuse the producer into a QLinear op.

    ``relu_is_clamp``: the output's zero point is its lowest code, so the quantizer's clamp
    already is the ReLU and onnxruntime drops the ``Relu`` (ReluQuantFusion). Otherwise the
    export is ``Q -> DQ -> Relu -> Q -> DQ``, which gives the same codes (``Q(relu(y)) =
    max(Q(y), zp)`` because 0 is on the grid) and leaves ``DQ -> Conv -> Q`` fusable.
    """
    if quantizer is None:
        return F.relu(y)
    if torch.onnx.is_in_onnx_export() and not relu_is_clamp:
        y = quantizer(y)
    return quantizer(F.relu(y))


def zero_point_is_qmin(quantizer: FrozenQuantizer | None) -> bool:
    """True if every zero point of ``quantizer`` is its lowest code (ReLU is then a no-op)."""
    return quantizer is not None and bool((quantizer.zero_point == quantizer.scheme.qmin).all())
