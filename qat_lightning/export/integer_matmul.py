"""A Linear with integer activations in ONNX: ``MatMulInteger`` on codes, scales in float.

This is the ONNX form of `GroupedIntegerLinear` (a Linear whose weight is per group, or
whose input encoding is dynamic: torchao's "8da4w" is dynamic int8 per-token activations
with int4 g32 weights). It computes what `qat_lightning.nn.grouped.grouped_linear` computes:

1. The input's codes: a static per-tensor encoding is a ``QuantizeLinear`` of
   ``x * (1/scale)`` (the rounding of torch); a dynamic one is computed in the graph with our
   own formula (`onnx_dynamic`), so the codes are the ones `convert` gives. Codes travel as
   uint8 (a signed scheme's codes + 128, see `activation_offset`).
2. ``MatMulInteger`` (int32 accumulation) of those codes with the weight's codes. A per-tensor
   input's zero point goes to ``MatMulInteger`` itself; a per-token one (one per row) is
   taken off in int32 afterwards: ``acc - zp[m] * sum_k (w[k, n] - zp_w[n])``, the column
   sums computed from the weight initializer by graph ops that onnxruntime folds into a
   constant when it loads the model (the file does not carry them). A per-group weight is a
   batched product ``[G, M, g] x [G, g, N]`` (one ``MatMulInteger``), each group's int32
   sums scaled by its own scales.
3. The float part: ``acc * s_w`` (summed over groups), ``* s_x``, ``+ bias`` in float32
   (`convert` scales in float64: the two agree to float32 rounding).

Weight codes are int8 (uint8 for an unsigned scheme), 4-bit ones stored as INT4/UINT4
initializers that onnxruntime widens once when it loads the model. 8-bit signed weights
with codes beyond +-64 are stored as uint8 (codes + 128, zero point + 128): onnxruntime's
u8 x s8 kernels on x86 without VNNI saturate at int16 (see `IntegerLayer._needs_unsigned_weights`).
"""

from __future__ import annotations

import torch

from qat_lightning.export.onnx_dynamic import onnx_dynamic_codes
from qat_lightning.export.qdq import (
    KEEP_NODE,
    ONNX_INT4,
    ONNX_UINT4,
    FrozenQuantizer,
    activation_offset,
    onnx_quantize,
)
from qat_lightning.quant import QTensor, QuantScheme

# The buffers `integer_matmul_constants` returns (registered on the layer while it exports).
CONSTANT_NAMES = ("mmi_weight", "mmi_weight_zero_point", "mmi_weight_scale")


def integer_matmul_problem(weight: QuantScheme, encoding: FrozenQuantizer | None) -> str | None:
    """Why a Linear with this weight scheme and input encoding has no ``MatMulInteger``
    form, or None."""
    if encoding is None:
        return "its input has no encoding; allowed an input quantizer or a quantized producer"
    source = encoding.scheme
    if weight.bits > 8:
        return f"weight bits={weight.bits}: MatMulInteger takes 8-bit codes; allowed bits <= 8"
    if source.bits > 8:
        return f"input bits={source.bits}: MatMulInteger takes 8-bit codes; allowed bits <= 8"
    if not source.dynamic and encoding.scale.dim() > 0:
        return (
            f"input granularity={source.granularity!r}: allowed a per_tensor static input, "
            "or a dynamic one (per_tensor or per_token)"
        )
    return None


def _weight_offset(q_w: QTensor) -> int:
    scheme = q_w.scheme
    if not scheme.signed or scheme.bits <= 4 or not q_w.codes.numel():
        return 0
    return 128 if int(q_w.codes.abs().max()) > 64 else 0


def integer_matmul_constants(q_w: QTensor) -> dict[str, torch.Tensor | None]:
    """The weight as ``MatMulInteger`` takes it: codes ``[K, N]`` (``[G, g, N]`` per group),
    their zero point (None when 0; ``[N]`` or ``[G, 1, N]``) and the weight scale (``[N]``
    or ``[G, 1, N]``), keyed by `CONSTANT_NAMES`."""
    scheme = q_w.scheme
    out_features, in_features = q_w.codes.shape
    offset = _weight_offset(q_w)
    container = torch.int8 if scheme.signed and not offset else torch.uint8
    codes = (q_w.codes.to(torch.int16) + offset).to(container)
    zero_point = (q_w.zero_point.to(torch.int16) + offset).to(container)
    scale = q_w.scale.float()
    if scheme.per_group:
        groups = in_features // scheme.group_size
        codes = codes.reshape(out_features, groups, scheme.group_size).permute(1, 2, 0)
        zero_point = zero_point.t().reshape(groups, 1, out_features)
        scale = scale.t().reshape(groups, 1, out_features)
    else:
        codes = codes.t()  # [K, N]
    if not bool((zero_point != 0).any()):
        zero_point = None
    values = (codes.contiguous(), zero_point, scale.contiguous())
    return dict(zip(CONSTANT_NAMES, values, strict=True))


def _weight_initializer(codes: torch.Tensor, int4: bool) -> torch.Tensor:
    """The weight codes in the graph: 4-bit ones as an INT4/UINT4 initializer (folded by
    the exporter) cast back to the 8-bit container, which onnxruntime folds when it loads."""
    if not int4:
        return codes
    to = ONNX_INT4 if codes.dtype == torch.int8 else ONNX_UINT4
    packed = torch.onnx.ops.symbolic("Cast", [codes], {"to": to}, dtype=to, shape=codes.shape)
    return torch.onnx.ops.symbolic(
        "Cast",
        [packed],
        {"to": 3 if codes.dtype == torch.int8 else 2},  # INT8 / UINT8
        dtype=codes.dtype,
        shape=codes.shape,
        metadata_props={KEEP_NODE: "int4 weight widened by onnxruntime"},
    )


def _column_sums(weight: torch.Tensor, zero_point: torch.Tensor | None, grouped: bool):
    """``sum_k (w[k, n] - zp[n])`` in int32 (``[N]``, or ``[G, 1, N]`` per group), as graph
    ops on the weight initializer: onnxruntime folds them into a constant when it loads the
    model, so the file does not carry them (4 bytes a column a group: 1/8 byte a weight)."""
    centered = weight.to(torch.int32)
    if zero_point is not None:
        centered = centered - zero_point.to(torch.int32)
    return centered.sum(dim=-2, keepdim=grouped, dtype=torch.int32)


def _input_codes(x: torch.Tensor, encoding: FrozenQuantizer):
    """uint8 codes of ``x``, its float32 scale, and its zero point (uint8 0-d per tensor;
    int32 ``(..., 1)`` per token), all with the uint8 offset of a signed scheme."""
    scheme = encoding.scheme
    offset = activation_offset(scheme)
    if not scheme.dynamic:
        codes = onnx_quantize(x, encoding.scale, encoding.zero_point, scheme, None, True)
        return codes, encoding.scale.float(), (encoding.zero_point + offset).to(torch.uint8)
    codes, scale, zero_point = onnx_dynamic_codes(x, scheme)
    codes = (codes + offset).to(torch.uint8)
    per_token = scheme.granularity == "per_token"
    zero_point = (zero_point + offset).to(torch.int32 if per_token else torch.uint8)
    return codes, scale, zero_point


def onnx_integer_linear(
    x: torch.Tensor,
    encoding: FrozenQuantizer,
    constants: dict[str, torch.Tensor | None],
    bias: torch.Tensor | None,
    grouped: bool,
    int4: bool,
) -> torch.Tensor:
    """``linear(x, w) + bias`` as ``MatMulInteger`` and float scaling (see the module
    docstring); ``constants`` from `integer_matmul_constants`."""
    weight, weight_zp, weight_scale = (constants[k] for k in CONSTANT_NAMES)
    out_features = weight.shape[-1]
    lead = x.shape[:-1]
    codes, scale, zero_point = _input_codes(x, encoding)
    per_token = zero_point.dtype == torch.int32
    if grouped:
        groups, group = weight.shape[0], weight.shape[1]
        codes = codes.reshape(-1, groups, group).transpose(0, 1)  # [G, M, g]
        if per_token:
            zero_point = zero_point.reshape(1, -1, 1)
            scale = scale.reshape(-1, 1)
    a_zp = None if per_token else zero_point
    weight = _weight_initializer(weight, int4)
    acc = torch.onnx.ops.symbolic(
        "MatMulInteger",
        [codes, weight, a_zp, weight_zp],
        dtype=torch.int32,
        shape=(*codes.shape[:-1], out_features),
    )
    if per_token:  # the activation zero point, one per row, taken off in int32
        acc = acc - zero_point * _column_sums(weight, weight_zp, grouped)
    if grouped:
        y = (acc.float() * weight_scale).sum(0) * scale  # [M, N]
    else:
        y = acc.float() * (scale * weight_scale)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_features)
