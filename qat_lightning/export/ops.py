"""`QuantizedOp`: every quantized module without a stored integer weight (add, pools,
activations, cat, ...) in a converted model, and the ONNX forms some of them export as.

In eager mode it runs the module's own integer simulation (``quantized_forward``) on the
quantized float inputs; under ``torch.onnx.export`` it runs the module's ONNX form
(``onnx_forward``: by default its fake-quant forward, whose frozen quantizers become
``QuantizeLinear`` / ``DequantizeLinear`` pairs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat_lightning.export.modules import _Converted, freeze
from qat_lightning.export.qdq import on_grid_for_onnx
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer_eval import exact_arithmetic
from qat_lightning.quant import QTensor, Quantizer


def _freeze_quantizers(module: QuantModule) -> None:
    for i, quantizer in enumerate(module.input_quantizers):
        module.input_quantizers[i] = freeze(quantizer, input_side=True)
    for i, quantizer in enumerate(module.output_quantizers):
        module.output_quantizers[i] = freeze(quantizer)
    for name, quantizer in list(module.param_quantizers.items()):
        module.param_quantizers[name] = freeze(quantizer)


class QuantizedOp(_Converted):
    """Any other quantized module, quantizers frozen: integer simulation via its
    ``quantized_forward`` in eager mode, its (QDQ) float forward in ONNX export.

    ``integer_mode`` (uint8 buffer) is 0 when some float input has no encoding (neither an
    input quantizer nor a quantized producer): such a module runs its fake-quant forward.
    """

    def __init__(self, module: QuantModule, borrowed: list[Quantizer | None]) -> None:
        super().__init__()
        _freeze_quantizers(module)
        self.module = module.eval()
        self.borrowed_encodings = nn.ModuleList(
            [
                None if own is not None else freeze(producer)
                for own, producer in zip(module.input_quantizers, borrowed, strict=True)
            ]
        )
        self.register_buffer("integer_mode", torch.ones((), dtype=torch.uint8))

    @property
    def input_quantizers(self) -> nn.ModuleList:  # the wrapped module's own, stored once
        return self.module.input_quantizers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.onnx.is_in_onnx_export():
            return self.module.onnx_forward(*self._on_grid(args), **kwargs)
        if not bool(self.integer_mode):
            return self.module(*args, **kwargs)
        slot = 0

        def to_q(value: Any) -> Any:
            nonlocal slot
            if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
                return type(value)(to_q(v) for v in value)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                encoding = self.input_encoding(slot)
                slot += 1
                if encoding is None:
                    raise ValueError(
                        f"{type(self.module).__name__}: float input {slot - 1} has no encoding"
                    )
                return encoding.quantize(value)
            return value

        qs = [to_q(a) for a in args]
        device = next((q.codes.device for q in _flat(qs) if isinstance(q, QTensor)), "cpu")
        with exact_arithmetic(device):
            return _dequantize_all(self.module.quantized_forward(*qs, **kwargs))

    def _on_grid(self, args: tuple) -> list:
        """Borrowed inputs get their ``Q -> DQ`` back where an op hid it (`on_grid_for_onnx`)."""
        slot, out = 0, []
        for arg in args:
            items = list(arg) if isinstance(arg, (list, tuple)) else [arg]
            for i, item in enumerate(items):
                if isinstance(item, torch.Tensor) and item.is_floating_point():
                    if slot < len(self.borrowed_encodings):
                        items[i] = on_grid_for_onnx(self.borrowed_encodings[slot], item)
                    slot += 1
            out.append(type(arg)(items) if isinstance(arg, (list, tuple)) else items[0])
        return out

    def extra_repr(self) -> str:
        return "integer" if bool(self.integer_mode) else "fake-quant (an input has no encoding)"


def _flat(values: list) -> list:
    return [v for value in values for v in (value if isinstance(value, list | tuple) else [value])]


def _dequantize_all(value: Any) -> Any:
    if isinstance(value, QTensor):
        return value.dequantize()
    if isinstance(value, (list, tuple)):
        return type(value)(_dequantize_all(v) for v in value)
    return value
