"""`IntegerRNN`: a quantized LSTM / GRU / RNN in a converted model, and its ONNX form.

The weight matrices are stored as integer codes (``<name>_codes`` buffers, int8 for 8 bits
and fewer) with the frozen per-gate-row encodings of the QAT layer's weight quantizers; the
float weights are dropped, the float biases kept. Eager mode dequantizes the codes and runs
torch's recurrent kernel, as the QAT layer's eval does (`qat_lightning.nn.rnn`), so the two
agree bit for bit.

In ONNX each layer is one ``LSTM`` / ``GRU`` / ``RNN`` node (both directions in one node),
fed by ``DequantizeLinear`` of the int8 ``W`` and ``R`` initializers (gate rows reordered
to ONNX's order: torch's LSTM ``i f g o`` is ONNX's ``i o f c``, torch's GRU ``r z n`` is
ONNX's ``z r h`` with ``linear_before_reset=1``). Layers are chained with ONNX's output
``[seq, directions, batch, hidden]`` laid out as torch's ``[seq, batch, directions * hidden]``.
onnxruntime runs these ops in float on the dequantized weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.qdq import onnx_dequantize
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer_eval import exact_arithmetic
from qat_lightning.quant import QTensor, Quantizer

# torch's gate blocks in ONNX's order, and the ONNX op, per torch mode
_ONNX_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN_TANH": [0], "RNN_RELU": [0]}
_ONNX_OP = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


class IntegerRNN(QuantizedOp):
    """A converted recurrent layer: integer weight codes, float biases and states."""

    def __init__(self, module: QuantModule, borrowed: list[Quantizer | None]) -> None:
        super().__init__(module, borrowed)
        self.weight_names = list(module.weight_names)
        # weights without an active quantizer (``params=None``) stay float parameters
        self.integer_names = [n for n in self.weight_names if module.param_quantizers[n]]
        for name in self.integer_names:
            weight = module._parameters.pop(name)
            codes = module.param_quantizers[name].quantize(weight.detach()).codes
            self.register_buffer(f"{name}_codes", codes)
        module.__dict__["_flat_weights"] = [
            None if n in self.integer_names else getattr(module, n)
            for n in module._flat_weights_names
        ]

    def weight(self, name: str) -> torch.Tensor:
        """The weight matrix ``name``, dequantized (or float, where it has no quantizer)."""
        if name not in self.integer_names:
            return getattr(self.module, name)
        quantizer = self.module.param_quantizers[name]
        codes = getattr(self, f"{name}_codes")
        return QTensor(codes, quantizer.scale, quantizer.zero_point, quantizer.scheme).dequantize()

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        self.module._check_input(input)
        if torch.onnx.is_in_onnx_export():
            return self._onnx_forward(input, hx)
        source = self.input_encoding(0)
        with exact_arithmetic(input.device):
            x = input if source is None else source.quantize(input).dequantize().to(input.dtype)
            weights = {name: self.weight(name) for name in self.weight_names}
            return self.module.run_float(x, hx, weights)

    # -- ONNX -----------------------------------------------------------------------------------
    def _onnx_weight(self, names: list[str]) -> torch.Tensor:
        """``[directions, gates * hidden, in]``: ``DequantizeLinear`` of the int8 codes of
        ``names`` (one per direction) with their gate rows in ONNX's order."""
        rnn = self.module
        gates = _ONNX_GATES[rnn.mode]
        hidden = rnn.hidden_size
        rows = torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in gates])
        if not all(name in self.integer_names for name in names):  # float weights
            return torch.stack([self.weight(name)[rows] for name in names])
        codes, scales, zero_points = [], [], []
        for name in names:
            quantizer = rnn.param_quantizers[name]
            codes.append(getattr(self, f"{name}_codes")[rows])
            scale, zero_point = quantizer.scale, quantizer.zero_point
            per_row = scale.dim() > 0
            scales.append(scale[rows] if per_row else scale.expand(len(rows)))
            zero_points.append(zero_point[rows] if per_row else zero_point.expand(len(rows)))
        stacked = torch.cat(codes)
        zero_point = torch.cat(zero_points).to(stacked.dtype)
        weight = onnx_dequantize(stacked, torch.cat(scales).float(), zero_point, axis=0)
        return weight.reshape(len(names), len(rows), stacked.shape[-1])

    def _onnx_bias(self, layer: int, suffixes: list[str]) -> torch.Tensor | None:
        rnn = self.module
        if not rnn.bias:
            return None
        gates = _ONNX_GATES[rnn.mode]
        hidden = rnn.hidden_size
        rows = torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in gates])
        per_direction = [
            torch.cat(
                [
                    getattr(rnn, f"bias_ih_l{layer}{s}")[rows],
                    getattr(rnn, f"bias_hh_l{layer}{s}")[rows],
                ]
            )
            for s in suffixes
        ]
        return torch.stack(per_direction)

    def _onnx_forward(self, x: torch.Tensor, hx: Any) -> Any:
        rnn = self.module
        own = rnn.input_quantizers[0]
        x = own(x) if own is not None else self._on_grid([x])[0]
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif rnn.batch_first:
            x = x.transpose(0, 1)  # onnxruntime runs layout 0 only: [seq, batch, input]
        lstm = rnn.mode == "LSTM"
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        if unbatched and h0 is not None:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        directions = 2 if rnn.bidirectional else 1
        suffixes = ["", "_reverse"][:directions]
        attrs: dict[str, Any] = {
            "hidden_size": rnn.hidden_size,
            "direction": "bidirectional" if rnn.bidirectional else "forward",
        }
        if rnn.mode == "GRU":
            attrs["linear_before_reset"] = 1
        if rnn.mode.startswith("RNN_"):
            attrs["activations"] = ["Tanh" if rnn.mode == "RNN_TANH" else "Relu"] * directions
        seq, batch = x.shape[0], x.shape[1]
        hidden = rnn.hidden_size
        state = [directions, batch, hidden]
        final_h, final_c = [], []
        for layer in range(rnn.num_layers):
            w = self._onnx_weight([f"weight_ih_l{layer}{s}" for s in suffixes])
            r = self._onnx_weight([f"weight_hh_l{layer}{s}" for s in suffixes])
            b = self._onnx_bias(layer, suffixes)
            span = slice(layer * directions, (layer + 1) * directions)
            inputs = [x, w, r, b, None, None if h0 is None else h0[span]]
            if lstm:
                inputs.append(None if c0 is None else c0[span])
            outputs = torch.onnx.ops.symbolic_multi_out(
                _ONNX_OP[rnn.mode],
                inputs,
                attrs,
                dtypes=[torch.float32] * (3 if lstm else 2),
                shapes=[[seq, directions, batch, hidden], state, state][: 3 if lstm else 2],
            )
            y = outputs[0]
            final_h.append(outputs[1])
            if lstm:
                final_c.append(outputs[2])
            x = y.transpose(1, 2).reshape(seq, batch, directions * hidden)
        output = x
        if unbatched:
            output = output.squeeze(1)
        elif rnn.batch_first:
            output = output.transpose(0, 1)
        h_n = torch.cat(final_h)
        c_n = torch.cat(final_c) if lstm else None
        if unbatched:
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return (output, (h_n, c_n)) if lstm else (output, h_n)

    def report_row(self, name: str) -> dict[str, Any]:
        """Its row in `layer_report`: every weight matrix and bias, as stored."""
        rnn = self.module
        integer = [getattr(self, f"{n}_codes") for n in self.integer_names]
        floats = list(rnn.parameters())
        params = sum(t.numel() for t in integer + floats)
        bits = {rnn.param_quantizers[n].scheme.bits for n in self.integer_names}
        stored = sum(t.numel() * t.element_size() for t in [*self.buffers(), *floats])
        return {
            "name": name,
            "type": type(rnn).__name__,
            "status": "integer" if integer else "float",
            "weight_bits": max(bits) if bits else None,
            "params": params,
            "float_bytes": 4 * params,
            "stored_bytes": stored,
        }

    def extra_repr(self) -> str:
        bits = {self.module.param_quantizers[n].scheme.bits for n in self.integer_names}
        weights = f"W{'/'.join(map(str, sorted(bits)))}" if bits else "float"
        return f"{self.module.mode}: {weights} weights, float states"


def convert_recurrent(module: nn.Module, borrowed: list[Quantizer | None]) -> nn.Module:
    """`convert`'s form of a recurrent family (``convert_as == "recurrent"``)."""
    return IntegerRNN(module, borrowed)
