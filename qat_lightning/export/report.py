"""The layer table of a converted model: which layers compute in integers, which stay float,
and what their weights cost in bytes."""

from __future__ import annotations

from typing import Any

from torch import nn

from qat_lightning.export.modules import IntegerEmbedding, IntegerLayer
from qat_lightning.export.ops import QuantizedOp


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_report(model: nn.Module) -> dict[str, Any]:
    """One row per layer that holds weights or computes with quantized values.

    Args:
        model: a converted model (see `convert`).

    Returns:
        ``{"layers": [...], "quantized_layers": [...], "float_layers": [...], "totals": {...}}``.
        Each row: ``name``, ``type``, ``status`` (``"integer"``, ``"fake-quant"`` or
        ``"float"``), ``weight_bits`` (None for float), ``params`` (weight elements),
        ``float_bytes`` (as fp32) and ``stored_bytes`` (as stored).
    """
    rows: list[dict[str, Any]] = []
    inside: list[str] = []

    def covered(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in inside)

    for name, module in model.named_modules():
        if covered(name):
            continue
        if isinstance(module, (IntegerLayer, IntegerEmbedding)):
            inside.append(name)
            numel = 1
            for size in module.weight_shape:
                numel *= size
            params = numel + (
                module.bias_codes.numel() if getattr(module, "bias_codes", None) is not None else 0
            )
            rows.append(
                {
                    "name": name,
                    "type": type(module.op).__name__,
                    "status": "integer",
                    "weight_bits": module.weight_scheme.bits,
                    "params": params,
                    "float_bytes": 4 * params,
                    "stored_bytes": _nbytes(module.buffers()),
                }
            )
        elif callable(getattr(module, "report_row", None)):  # a family's own (`IntegerRNN`)
            inside.append(name)
            rows.append(module.report_row(name))
        elif isinstance(module, QuantizedOp):
            inside.append(name)
            inner = module.module
            weight = dict(inner.param_quantizers.items()).get("weight")
            params = sum(p.numel() for p in inner.parameters())
            rows.append(
                {
                    "name": name,
                    "type": type(inner).__name__,
                    "status": "integer" if bool(module.integer_mode) else "fake-quant",
                    "weight_bits": weight.scheme.bits if weight is not None else None,
                    "params": params,
                    "float_bytes": 4 * params,
                    "stored_bytes": _nbytes(module.buffers()) + _nbytes(module.parameters()),
                }
            )
        elif any(True for _ in module.parameters(recurse=False)):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "status": "float",
                    "weight_bits": None,
                    "params": params,
                    "float_bytes": 4 * params,
                    "stored_bytes": _nbytes(module.parameters(recurse=False))
                    + _nbytes(module.buffers(recurse=False)),
                }
            )
    float_bytes = sum(r["float_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    return {
        "layers": rows,
        "quantized_layers": [r["name"] for r in rows if r["status"] == "integer"],
        "float_layers": [r["name"] for r in rows if r["status"] != "integer"],
        "totals": {
            "params": sum(r["params"] for r in rows),
            "float_bytes": float_bytes,
            "stored_bytes": stored,
            "compression": round(stored / float_bytes, 4) if float_bytes else None,
        },
    }
