"""Quantized recurrent layers: `nn.LSTM`, `nn.GRU` and `nn.RNN` with integer weight matrices.

Every weight matrix (``weight_ih_l<k>[_reverse]``, ``weight_hh_l<k>[_reverse]``) gets a weight
quantizer, per channel along axis 0: one scale per gate row (the rows of the stacked gate
matrices). Training fake-quantizes them (straight-through gradient) and runs torch's own
recurrent kernel on them; the biases, the hidden and cell states and the gate arithmetic stay
float, as in onnxruntime's ``LSTM`` / ``GRU`` / ``RNN`` ops, which the export feeds with
``DequantizeLinear`` of the int8 weight initializers. The input sequence is quantized with the
layer's input encoding (its own input quantizer, or its producer's where surgery pruned it);
the outputs (the sequence and the final states) are float, so every consumer keeps its own
input quantizer (a final cell state is on no grid).

Eval without autograd computes exactly what `convert`'s `IntegerRNN` computes: the input
quantized to codes and dequantized, the weights the dequantized codes, torch's float kernel on
them (the same op on the same float values, so the two agree bit for bit).

Refused (``from_float`` raises ``ValueError``, so surgery leaves the layer float and reports
it): ``proj_size > 0`` (the ONNX LSTM has no projection) and per-group weight schemes. A
``PackedSequence`` input is refused at ``forward`` with a ``TypeError``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer_eval import exact_arithmetic, integer_eval_allowed
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor, QuantScheme

# torch's warning when the weights it is given are not one flat cuDNN buffer (they are the
# fake-quantized copies here, by design).
_NOT_CONTIGUOUS = "RNN module weights are not part of single contiguous chunk"


class _QuantRNNBase(QuantModule):
    """The shared behaviour of QuantLSTM, QuantGRU and QuantRNN (see the module docstring)."""

    convert_as: ClassVar[str] = "recurrent"
    _float_rnn: ClassVar[type[nn.RNNBase]]

    @property
    def _quantized_params(self) -> dict[str, int]:  # type: ignore[override]
        """Every weight matrix, per gate row (axis 0); biases stay float."""
        return {name: 0 for name in self._flat_weights_names if name.startswith("weight_")}

    @property
    def weight_names(self) -> list[str]:
        """The names of the quantized weight matrices, in torch's flat-weight order."""
        return [name for name in self._flat_weights_names if name.startswith("weight_")]

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
    ) -> QuantModule:
        """A quantized twin of the recurrent ``module`` sharing its parameters.

        Raises:
            ValueError: ``proj_size > 0``, or a per-group weight scheme.
        """
        if getattr(module, "proj_size", 0) > 0:
            raise ValueError(
                f"{type(module).__name__}(proj_size={module.proj_size}) is not supported: "
                "onnxruntime's LSTM has no projection; allowed proj_size=0"
            )
        params = QuantScheme.from_any(params)
        if params is not None and params.per_group:
            raise ValueError(
                f"{type(module).__name__}: a per-group weight scheme (group_size="
                f"{params.group_size}) is not supported for recurrent weights; allowed "
                "per_tensor or per_channel (one scale per gate row)"
            )
        if params is not None and params.per_channel and params.axis != 0:
            params = params.replace(axis=0)
        return super().from_float(module, inputs, params)

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        super()._init_quantizers(inputs, params, outputs)
        self.output_quantizers = nn.ModuleList([None])  # the outputs are float (docstring)

    # -- forward ----------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if isinstance(x, PackedSequence):
            raise TypeError(
                f"{type(self).__name__}({self.input_size}, {self.hidden_size}): a "
                "PackedSequence input is not supported by the quantized layer; allowed a "
                "padded tensor (skip this layer in the QuantConfig to keep it float)"
            )

    def integer_mode(self, x: torch.Tensor) -> bool:
        """True where ``forward`` runs the form `convert` exports (codes, dequantized)."""
        if not integer_eval_allowed(self):
            return False
        quantizers = [self.param_quantizers[name] for name in self.weight_names]
        source = self.input_encoding(0)
        if source is not None:
            if source.scheme.dynamic or source.encoding()[0].dim() > 0:
                return False
            quantizers.append(source)
        return all(
            q is not None and q.is_initialized and bool(q.fake_quant_enabled) for q in quantizers
        )

    def forward(self, input: Any, hx: Any = None) -> Any:
        self._check_input(input)
        if self.integer_mode(input):
            with exact_arithmetic(input.device):
                source = self.input_encoding(0)
                x = input if source is None else source.quantize(input).dequantize()
                weights = {
                    name: self.param_quantizers[name].quantize(getattr(self, name)).dequantize()
                    for name in self.weight_names
                }
                return self.run_float(x.to(input.dtype), hx, weights)
        weights = {name: self.fq_param(name) for name in self.weight_names}
        return self.run_float(self.fq_input(input), hx, weights)

    def run_float(self, x: torch.Tensor, hx: Any, weights: dict[str, torch.Tensor]) -> Any:
        """torch's recurrent forward on ``x`` with ``weights`` in place of the weight
        matrices (the float parameters for the biases); what integer mode and `convert` run."""
        if hasattr(self, "_flat_weight_refs"):
            self._update_flat_weights()  # so the float forward's own check finds no change
        saved = self.__dict__["_flat_weights"]
        flat = [weights[n] if n in weights else getattr(self, n) for n in self._flat_weights_names]
        flat = [w.to(x.dtype) if w is not None and w.dtype != x.dtype else w for w in flat]
        self.__dict__["_flat_weights"] = flat
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NOT_CONTIGUOUS)
                return self._float_rnn.forward(self, x, hx)
        finally:
            self.__dict__["_flat_weights"] = saved

    def quantized_forward(self, q: QTensor, hx: Any = None) -> Any:
        """The integer-mode forward on input codes ``q``: float outputs (see the module
        docstring; the outputs have no encoding)."""
        weights = {
            name: self.param_quantizers[name].quantize(getattr(self, name)).dequantize()
            for name in self.weight_names
        }
        return self.run_float(self.input_qtensor(q).dequantize(), hx, weights)


@register_quant_module(nn.LSTM)
class QuantLSTM(_QuantRNNBase, nn.LSTM):
    """`nn.LSTM` with integer weight matrices (per gate row) and a quantized input; float
    gates and states (onnxruntime's LSTM on ``DequantizeLinear`` weights)."""

    _float_rnn: ClassVar[type[nn.RNNBase]] = nn.LSTM


@register_quant_module(nn.GRU)
class QuantGRU(_QuantRNNBase, nn.GRU):
    """`nn.GRU` with integer weight matrices (per gate row) and a quantized input."""

    _float_rnn: ClassVar[type[nn.RNNBase]] = nn.GRU


@register_quant_module(nn.RNN)
class QuantRNN(_QuantRNNBase, nn.RNN):
    """`nn.RNN` (tanh or ReLU) with integer weight matrices (per row) and a quantized input."""

    _float_rnn: ClassVar[type[nn.RNNBase]] = nn.RNN
