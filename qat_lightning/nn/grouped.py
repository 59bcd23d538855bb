"""Per-group weights and dynamic activations in the quantized layers.

Two things live here, called from a few places of `base` and `linear`:

- `param_quantizer`: the weight quantizer of a layer, checked against the weight: a per-group
  scheme applies to 2-D weights whose input dimension is the last axis (Linear ``(out, in)``,
  Embedding ``(num, dim)``), and its group size must divide that dimension; a dynamic scheme
  is refused for weights.
- `grouped_linear`: the integer simulation of a Linear whose weight is per group, or whose
  input is dynamic (per tensor or per token). Each group's products are summed exactly on
  integer codes (int32-exact, in float32 where that is provably exact), each group sum is
  scaled by ``s_in * s_w[group]`` and the groups summed in float64, the bias added in float:
  the arithmetic of an integer kernel with per-block scales (onnxruntime's MatMulNBits with
  int8 activations, torchao's 8da4w). A per-channel or per-tensor weight is one group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qat_lightning.quant import QTensor, Quantizer, QuantScheme
from qat_lightning.quant.grouped import GroupSizeError, group_shape

if TYPE_CHECKING:
    from qat_lightning.nn.base import QuantModule

_DIMENSION = {nn.Embedding: "embedding dimension"}


def _dimension_name(module: nn.Module) -> str:
    return next((v for k, v in _DIMENSION.items() if isinstance(module, k)), "input dimension")


def param_quantizer(
    module: nn.Module, name: str, param: torch.Tensor, scheme: QuantScheme, axis: int
) -> Quantizer:
    """The quantizer of parameter ``name`` (output-channel ``axis``) under ``scheme``.

    Raises:
        ValueError: ``scheme`` is dynamic (activations only).
        GroupSizeError: a per-group ``scheme`` on a weight that is not 2-D with its output
            channels first, or whose last dimension ``group_size`` does not divide.
    """
    what = f"{type(module).__name__}.{name}"
    if scheme.dynamic:
        raise ValueError(
            f"{what}: a dynamic scheme (dynamic=True) is for activations; a weight's range "
            "is known before it is used: allowed a static weight scheme (dynamic=False)"
        )
    if scheme.per_group:
        if param.dim() != 2 or axis != 0:
            raise GroupSizeError(
                f"{what} of shape {tuple(param.shape)}: per_group applies to 2-D weights "
                "grouped along their input dimension (Linear, Embedding); allowed per_tensor "
                "or per_channel for this layer (an override, or skip it)"
            )
        dim = param.shape[-1]
        if dim % scheme.group_size:
            try:
                group_shape(param.shape, scheme.group_size, what)
            except GroupSizeError as error:
                raise GroupSizeError(
                    f"{error} (the {_dimension_name(module)} of this layer)"
                ) from None
        return Quantizer(scheme, shape=tuple(param.shape)).to(param.device)
    channels = param.shape[axis] if scheme.per_channel else None
    scheme = scheme.replace(axis=axis) if scheme.per_channel else scheme
    return Quantizer(scheme, num_channels=channels).to(param.device)


def uses_grouped_path(module: QuantModule) -> bool:
    """True where the integer simulation of a Linear is `grouped_linear`: its weight is per
    group, or its input encoding is dynamic."""
    weight = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None  # noqa: SIM401
    source = module.input_encoding(0)
    return (weight is not None and weight.scheme.per_group) or (
        source is not None and source.scheme.dynamic
    )


def _row_codes(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centered codes (int64) and scales (float64) of an input, the scales shaped ``(..., 1)``
    per token or ``()`` per tensor."""
    scale = q.scale.double()
    if q.scheme is not None and q.scheme.granularity == "per_token":
        scale = scale.unsqueeze(-1)
    elif scale.dim() > 0:
        raise ValueError("grouped integer Linear: the input encoding must be per tensor or token")
    return q.centered(torch.int64), scale


def _weight_groups(q_w: QTensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Centered weight codes (out, in), scales (out, groups) float64, and the group size."""
    out_features, in_features = q_w.codes.shape
    scheme = q_w.scheme
    scale = q_w.scale.double()
    if scheme is not None and scheme.per_group:
        return q_w.centered(torch.int64), scale, scheme.group_size
    if scale.dim() == 0:
        scale = scale.expand(out_features)
    return q_w.centered(torch.int64), scale.reshape(out_features, 1), in_features


def grouped_linear(
    q_in: QTensor, q_w: QTensor, bias: torch.Tensor | None, out_dtype=torch.float32
) -> torch.Tensor:
    """``linear(x, w) + bias`` from codes: exact integer sums per group, float64 scaling.

    Args:
        q_in: the input, per tensor or per token (dynamic or static encodings).
        q_w: the weight ``(out, in)``: per group, per channel (axis 0) or per tensor.
        bias: the float bias (added in float64), or None.

    Returns:
        The float result (``out_dtype``), shape ``(*q_in.shape[:-1], out)``.
    """
    x, s_x = _row_codes(q_in)
    w, s_w, group = _weight_groups(q_w)
    out_features, in_features = w.shape
    groups = in_features // group
    lead = x.shape[:-1]
    x = x.reshape(-1, groups, group)
    w = w.reshape(out_features, groups, group)
    # float32 sums integers exactly while every partial sum stays below 2**24.
    bound = float(x.abs().amax()) * float(w.abs().amax()) * group if x.numel() else 0.0
    dtype = torch.float32 if bound < 2**24 and x.device.type == "cpu" else torch.float64
    acc = torch.einsum("ngk,ogk->nog", x.to(dtype), w.to(dtype)).double()  # (n, out, groups)
    y = (acc * s_w).sum(-1).reshape(*lead, out_features) * s_x
    if bias is not None:
        y = y + bias.detach().double()
    return y.to(out_dtype)


def grouped_quantized_forward(
    module: QuantModule, q: QTensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> QTensor | torch.Tensor:
    """`quantized_forward` of a Linear on the grouped path: the output quantized to the
    module's output encoding (a `QTensor`), or the float result where it has none."""
    from qat_lightning.nn.integer import weight_qtensor

    own = module.input_quantizers[0]
    if own is not None and own.scheme.dynamic and q.scheme == own.scheme:
        q_in = q  # quantized by this very encoding: dynamic re-quantization is not idempotent
    else:
        q_in = module.input_qtensor(q)
    y = grouped_linear(q_in, weight_qtensor(module, weight), bias)
    out = module.output_quantizers[0]
    return y if out is None else out.quantize(y)


def table_rows(q_w: QTensor, indices: torch.Tensor) -> QTensor:
    """The rows of an embedding table's codes at ``indices``, each with its encoding: the
    whole table's (per tensor) or the rows' own group scales (per group)."""
    if q_w.scheme is not None and q_w.scheme.per_group:
        return QTensor(q_w.codes[indices], q_w.scale[indices], q_w.zero_point[indices], q_w.scheme)
    if q_w.scale.dim() > 0:
        raise ValueError(
            "QuantEmbedding: integer mode with a per-row table needs an output quantizer"
        )
    return QTensor(q_w.codes[indices], q_w.scale, q_w.zero_point, q_w.scheme)


def table_values(q_w: QTensor, indices: torch.Tensor) -> torch.Tensor:
    """The float32 values of an embedding table's rows at ``indices``, ``(codes - zp) * s``
    as fake quantization computes them, for a table per tensor, per row or per group."""
    if q_w.scheme is not None and q_w.scheme.per_channel and q_w.scale.dim() > 0:
        scale, zp = q_w.scale[indices].unsqueeze(-1), q_w.zero_point[indices].unsqueeze(-1)
        return (q_w.codes[indices].float() - zp.float()) * scale.float()
    return table_rows(q_w, indices).dequantize()
