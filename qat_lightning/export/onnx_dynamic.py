"""Dynamic activation encodings computed inside the ONNX graph, with our own formula.

onnxruntime's ``DynamicQuantizeLinear`` is per tensor, uint8 and affine only, and rounds its
scale its own way, so the codes it gives are not those `convert` computes. Instead the
export writes the formula of `qat_lightning.quant.grouped.dynamic_encoding` as torch ops that
the exporter turns into ``IsInf``/``IsNaN``/``Where``, ``ReduceMin``/``ReduceMax``, ``Div``,
``Round`` and ``Clip``: the scale and zero point come out bit for bit as in torch (float32
division and round-half-to-even are the same in both), and so do the codes,
``clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)`` as `Quantizer.quantize` computes
them.

These functions run only while ``torch.onnx.export`` traces a converted model.
"""

from __future__ import annotations

import torch

from qat_lightning.quant import QuantScheme
from qat_lightning.quant.functional import EPS


def onnx_dynamic_encoding(
    x: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float32) of a dynamic ``scheme`` for ``x``, as graph ops.

    Per token both have shape ``(*x.shape[:-1], 1)`` (they broadcast against ``x``); per
    tensor they are 0-d. The zero point holds integers (0 for a symmetric scheme).
    """
    xf = x.float()
    xf = torch.where(torch.isfinite(xf), xf, torch.zeros_like(xf))
    if scheme.granularity == "per_token":
        mn = torch.amin(xf, dim=-1, keepdim=True)
        mx = torch.amax(xf, dim=-1, keepdim=True)
    else:
        mn, mx = torch.min(xf), torch.max(xf)
    mn = torch.clamp(mn, max=0.0)
    mx = torch.clamp(mx, min=0.0)
    if scheme.symmetric:
        amax = mx if not scheme.signed else torch.maximum(-mn, mx)
        scale = torch.clamp(amax / scheme.qmax, min=EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((mx - mn) / (scheme.qmax - scheme.qmin), min=EPS)
    zero_point = torch.clamp(scheme.qmin - torch.round(mn / scale), scheme.qmin, scheme.qmax)
    return scale, zero_point


def onnx_dynamic_codes(
    x: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of ``x`` under a dynamic ``scheme``: float32 tensors
    holding integers in ``[qmin, qmax]`` (the codes) and the encoding of
    `onnx_dynamic_encoding`."""
    scale, zero_point = onnx_dynamic_encoding(x, scheme)
    codes = torch.clamp(
        torch.round(x.float() * (1.0 / scale)) + zero_point, scheme.qmin, scheme.qmax
    )
    return codes, scale, zero_point


def onnx_dynamic_fake_quant(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``(codes - zero_point) * scale``: the dynamic fake quantization of ``x`` in float ops,
    for a layer that has no integer form in ONNX (it runs in float in onnxruntime, as it
    runs in fake quant after `convert`)."""
    codes, scale, zero_point = onnx_dynamic_codes(x, scheme)
    return ((codes - zero_point) * scale).to(x.dtype)
