"""The integer arithmetic of quantized layers: one multiply-accumulate, one requantization.

`integer_mac` is the one integer multiply-accumulate: every MAC family (Linear, Conv,
ConvTranspose, the fused ConvBn, a user's own) runs it in eval-mode integer simulation, and
`convert`'s `IntegerLayer` runs it on the stored integer weights, so the two agree bit for bit
by construction. A family only says what its MAC is (the `QuantModule` layer protocol:
``mac_op``, ``mac_output_axis``, ``accumulator_channel_scale``, ...).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.eval_cache import attach_centered, centered_float32
from qat_lightning.quant import QTensor, Quantizer
from qat_lightning.quant.functional import code_dtype


def requantize(q: QTensor, quantizer: Quantizer | None) -> QTensor:
    """``q`` under ``quantizer``'s encoding (unchanged if there is none, or it is the same)."""
    if quantizer is None:
        return q
    return quantizer.quantize(q.dequantize())


def accumulate_to_qtensor(
    acc: torch.Tensor,
    acc_scale: torch.Tensor,
    quantizer: Quantizer | None,
    axis: int = 1,
    owned: bool = False,
) -> QTensor:
    """Requantize an integer accumulator (value ``acc * acc_scale``) to ``quantizer``.

    ``acc`` holds exact integers (float64 arithmetic on integer codes is exact below 2**53);
    ``acc_scale`` is 0-d or per channel along ``axis``. With no output quantizer the int32
    accumulator itself is returned, as a `QTensor` with scheme ``None``.

    To a per-tensor output encoding, the accumulator is requantized as integer runtimes
    (onnxruntime's QLinearConv / QGemm) do: ``round(float32(acc) * M) + zero_point`` with the
    float32 multiplier ``M = float32(s_in * s_w) / s_out``. Any other way of rounding differs
    from the runtime at near-ties, and such a one-code difference spreads through the layers
    that follow; this way the integer simulation and the exported model agree bit for bit.
    ``owned``: the caller gives ``acc`` up, and it may be overwritten (the same result).
    """
    view = [1] * acc.dim()
    if acc_scale.dim() > 0:
        view[axis] = -1
    if quantizer is None:
        zero = torch.zeros_like(acc_scale, dtype=torch.int32)
        return QTensor(acc.round().to(torch.int32), acc_scale.float(), zero, None, axis=axis)
    scale, zero_point = quantizer.encoding()
    # float32(acc) is exact below 2**24; a float32 accumulator is exact by construction
    # (`exact_accumulate` returns float32 only within that bound)
    exact = acc.dtype == torch.float32 or acc.numel() == 0 or acc.abs().max() < 2**24
    if scale.dim() == 0 and exact:
        multiplier = (acc_scale.float() / scale).reshape(view)
        # in place where it may be: big fresh tensors cost more than the arithmetic
        mine = owned and acc.dtype == torch.float32
        codes = acc.mul_(multiplier) if mine else acc.float() * multiplier
        codes.round_().add_(zero_point).clamp_(quantizer.scheme.qmin, quantizer.scheme.qmax)
        q = QTensor(codes.to(code_dtype(quantizer.scheme)), scale, zero_point, quantizer.scheme)
        return attach_centered(q, codes.sub_(zero_point))  # exact: integers below 2**16
    return quantizer.quantize((acc.double() * acc_scale.double().reshape(view)).float())


def quantize_bias(bias: torch.Tensor | None, acc_scale: torch.Tensor) -> torch.Tensor | None:
    """Bias as int32 codes at the accumulator scale ``s_in * s_w`` (as float64 integers)."""
    if bias is None:
        return None
    codes = torch.round(bias.detach().double() / acc_scale.double())
    return codes.clamp(-(2**31), 2**31 - 1)


def weight_qtensor(module: nn.Module, weight: torch.Tensor) -> QTensor:
    """Codes of a weight (``weight`` may be BN-folded) under the module's weight quantizer."""
    quantizer: Quantizer | None = module.param_quantizers["weight"]
    if quantizer is None:
        raise ValueError(
            f"{type(module).__name__}: integer mode needs a weight quantizer; this layer's "
            "weight is float"
        )
    return quantizer.quantize(weight.detach())


def exact_chunks(
    q_in: QTensor, q_w: QTensor, groups: int = 1, weight_input_axis: int = 1
) -> list[slice] | None:
    """Input-channel ranges whose products float32 sums exactly, or None (use float64).

    float32 adds integers exactly, in any order, while every partial sum stays below 2**24.
    A range is safe when the largest centered input code times the largest per-output-channel
    sum of ``|w - zw|`` over the range stays below that. Most 8-bit layers fit in one range;
    wide ones (a 3x3 conv over 512 channels) are split into a few, each run in float32 and
    summed in float64. Off the CPU (TF32, transform-based kernels) and for grouped layers
    that need splitting, the answer is float64. The weight's input channels lie along
    ``weight_input_axis``, its output channels along the other of its first two axes.
    """
    if q_in.codes.device.type != "cpu" or q_in.scheme is None:
        return None
    x_max = _input_bound(q_in)
    w = q_w.centered(torch.int64).abs()
    if w.numel() == 0:
        return [slice(None)]
    if weight_input_axis != 1:
        w = w.movedim(weight_input_axis, 1)
    per_input = (w.flatten(2).sum(2) if w.dim() > 2 else w).double()  # (out, in)
    cumulative = F.pad(per_input.cumsum(1), (1, 0))
    limit = 2**24 / x_max
    n_in = per_input.shape[1]
    pieces = max(1, math.ceil(float(cumulative[:, -1].max()) / limit))
    if pieces > 1 and groups > 1:
        return None
    while pieces <= n_in:
        bounds = [round(j * n_in / pieces) for j in range(pieces + 1)]
        sums = cumulative[:, bounds[1:]] - cumulative[:, bounds[:-1]]
        if float(sums.max()) < limit:
            return [slice(a, b) for a, b in itertools.pairwise(bounds)]
        pieces += 1
    return None  # one input channel alone is too wide


def exact_accumulate(
    op: Callable,
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    chunks: list[slice] | None,
    axis: int,
    weight_input_axis: int = 1,
) -> torch.Tensor:
    """``op(x, w) + bias`` on centered integer codes, exactly: in float32 per range of
    `exact_chunks` (float64 sum of the ranges, then the bias), or all in float64 (``chunks``
    None). ``axis`` is the channel axis of ``x`` and of the result. A float32 result is exact
    integers below 2**24."""
    if chunks is None:
        return op(x.double(), w.double(), None if bias is None else bias.double())
    x, w = x.float(), w.float()
    if len(chunks) == 1:
        acc = op(x, w, None)
        exact = bias is None or float(acc.abs().max()) + float(bias.abs().max()) < 2**24
        view = [1] * acc.dim()
        view[axis] = -1
        if exact:
            return acc if bias is None else acc + bias.float().reshape(view)
        return acc.double() + bias.double().reshape(view)
    acc = sum(
        op(
            x.narrow(axis, c.start, c.stop - c.start),
            w.narrow(weight_input_axis, c.start, c.stop - c.start),
            None,
        ).double()
        for c in chunks
    )
    if bias is not None:
        view = [1] * acc.dim()
        view[axis] = -1
        acc = acc + bias.double().reshape(view)
    return acc


def accumulator_scale(family: type, layer: nn.Module, s_in: torch.Tensor, s_w: torch.Tensor):
    """``s_in * s_w`` (float64) per output channel of ``family``'s accumulator (0-d for a
    per-tensor weight)."""
    return s_in.double() * family.accumulator_channel_scale(layer, s_w.double())


@dataclass(frozen=True)
class MacWeights:
    """What `integer_mac` derives from the weight and the encodings alone, not from the input
    values: a layer computes it once and reuses it until a weight, a BN statistic or an
    encoding changes (`QuantMAC`'s eval cache).

    ``w``: the centered weight codes (float32 where ``chunks`` is set, else int64);
    ``chunks``: `exact_chunks`; ``bias``: the int32 bias codes as float64 (or None);
    ``acc_scale``: `accumulator_scale`; ``bias_in_op``: a bound proves that the float32 op
    adds the bias exactly too (one range, ``x_max * sum|w - zw| + |b| < 2**24`` per output
    channel), so it runs inside the op.
    """

    q_w: QTensor
    w: torch.Tensor
    chunks: list[slice] | None
    bias: torch.Tensor | None
    acc_scale: torch.Tensor
    bias_in_op: bool


def mac_weights(
    family: type,
    layer: nn.Module,
    q_in: QTensor,
    q_w: QTensor,
    bias_codes: torch.Tensor | None,
) -> MacWeights:
    """The weight-side part of `integer_mac` for an input with ``q_in``'s encoding (its codes
    are not read)."""
    if q_in.scale.dim() > 0:
        raise ValueError(f"{type(layer).__name__}: integer mode needs a per-tensor input scale")
    acc_scale = accumulator_scale(family, layer, q_in.scale, q_w.scale)
    in_axis = family.mac_weight_input_axis
    chunks = None
    if family.mac_float32_exact:
        chunks = exact_chunks(q_in, q_w, getattr(layer, "groups", 1), in_axis)
    # codes and zero points of at most 16 bits: float32 holds them and their difference
    w = q_w.centered(torch.int64) if chunks is None else q_w.centered_float()
    bias = None if bias_codes is None else bias_codes.double()
    bias_in_op = False
    if chunks is not None and len(chunks) == 1 and bias is not None:
        bound = _input_bound(q_in) * _per_output_abs_sum(q_w, in_axis) + bias.abs()
        bias_in_op = bound.numel() > 0 and bool(bound.max() < 2**24)
    return MacWeights(q_w, w, chunks, bias, acc_scale, bias_in_op)


def _input_bound(q_in: QTensor) -> float:
    """The largest ``|x - zx|`` of an input code under ``q_in``'s scheme."""
    zx = float(q_in.zero_point.abs().max()) if q_in.zero_point.numel() else 0.0
    return max(abs(q_in.scheme.qmin), abs(q_in.scheme.qmax)) + zx


def _per_output_abs_sum(q_w: QTensor, weight_input_axis: int) -> torch.Tensor:
    """``sum |w - zw|`` per output channel (float64)."""
    w = q_w.centered(torch.int64).abs()
    if weight_input_axis != 1:
        w = w.movedim(weight_input_axis, 1)
    return w.flatten(1).sum(1).double()


def integer_mac(
    family: type,
    layer: nn.Module,
    q_in: QTensor,
    q_w: QTensor,
    bias_codes: torch.Tensor | None,
    output: Quantizer | None,
    extra: tuple[Any, ...] = (),
    relu: bool = False,
    weights: MacWeights | None = None,
) -> QTensor:
    """The integer pipeline of a multiply-accumulate layer; the only one there is.

    ``family`` is the quantized class (its ``mac_op(layer, x, w, b, *extra)``, linear in ``x``,
    runs on centered integer codes exactly, see `exact_chunks`), ``layer`` the module whose
    hyperparameters the op reads (the quantized layer itself, or `convert`'s weightless
    twin). The accumulator holds ``sum((x - zx)(w - zw)) + bias_codes`` at scale
    ``s_in * s_w`` (``bias_codes``: int32 values, as float64 or int32); ``relu`` applies ReLU to
    it (it commutes with the positive scale); it is then requantized to ``output``.
    ``weights``: `mac_weights` of these ``q_w`` and ``bias_codes`` for ``q_in``'s encoding,
    where the caller keeps it (the result is the same, bit for bit).
    """
    if weights is None:
        weights = mac_weights(family, layer, q_in, q_w, bias_codes)
    in_axis = family.mac_weight_input_axis
    axis = family.mac_output_axis

    def op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return family.mac_op(layer, x, w, b, *extra)

    if weights.bias_in_op:  # exact by the bound: the same integers as adding it afterwards
        acc = op(_centered_input(q_in, True), weights.w, weights.bias.float())
    else:
        x = _centered_input(q_in, weights.chunks is not None)
        acc = exact_accumulate(op, x, weights.w, weights.bias, weights.chunks, axis, in_axis)
    if relu:
        acc = F.relu_(acc)  # acc is a new tensor, ours
    return accumulate_to_qtensor(acc, weights.acc_scale, output, axis=axis, owned=True)


def _centered_input(q_in: QTensor, as_float: bool) -> torch.Tensor:
    """``codes - zero_point`` of the input: float32 (one new tensor) or int64."""
    if not as_float:
        return q_in.centered(torch.int64)
    centered = centered_float32(q_in)
    if centered is not None:
        return centered
    if q_in.scheme is None or q_in.scheme.bits > 16:
        return q_in.centered_float()  # raises: float32 does not hold such codes
    _, zp = q_in.broadcast_encoding()
    return q_in.codes.float().sub_(zp.float())
