"""The protocol every quantized module follows (the registry of float -> quantized types is in
`registry`, the integer arithmetic in `integer`).

A quantized module is a subclass of its float twin (``QuantConv2d(QuantModule, nn.Conv2d)``),
built by `from_float` around the float module's own `Parameter` objects. It *has* quantizers:

- ``input_quantizers`` (`nn.ModuleList`): one slot per tensor input. A slot is ``None`` when
  the input arrives already quantized (the producer's output quantizer owns that encoding).
- ``output_quantizers`` (`nn.ModuleList`): one slot; the encoding of what the module produces.
- ``param_quantizers`` (`nn.ModuleDict`, by parameter name): ``None`` for parameters kept in
  float during QAT (a bias is quantized to int32 at ``s_in * s_w`` only in integer mode).

``forward`` is fake quantization (float in, float out). ``quantized_forward`` is the integer
simulation: a `QTensor` in, integer arithmetic with int32 accumulation, a `QTensor` out.

In eval mode without autograd, once every encoding a module needs is set, ``forward`` runs the
integer simulation (`integer_in_eval`): float32 fake quant sums the same products in another
order and rounds near-ties of the requantization differently, and at low bit widths or through
50 layers those one-code differences flip predictions. So what validation reports during QAT is
what the converted integer model computes, bit for bit (and what an integer runtime computes,
up to its own rare one-step rounding differences).

The layer protocol (the "layer protocol" section of `QuantModule`) is what the rest of the
package asks a quantized layer instead of keeping lists of types: whether its output keeps its
input's grid, what `convert` makes of it, its multiply-accumulate (for `integer_mac`), whether
it applies a ReLU, its ONNX form. A new family, inside the package or outside it, sets these.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.nn.eval_cache import dequantize_linked, quantize_linked
from qat_lightning.nn.grouped import param_quantizer
from qat_lightning.nn.integer import requantize
from qat_lightning.nn.integer_eval import (
    INTEGER_INPUT_DTYPES,
    integer_eval_allowed,
    tensor_inputs,
)
from qat_lightning.nn.split_fake_quant import after_relu, must_be_called
from qat_lightning.quant import QTensor, Quantizer, QuantScheme
from qat_lightning.quant.functional import dequantize_ste, quantize_ste


def _ready(quantizer: Quantizer) -> bool:
    return quantizer.is_initialized and bool(quantizer.fake_quant_enabled)


class QuantModule(nn.Module):
    """Mixin base for quantized modules; put it first: ``class Q(QuantModule, nn.Linear)``.

    Under ``torch.compile`` every quantized module's ``forward`` (each subclass's, a user's
    family too) runs eagerly: one graph break per quantized layer, the float code between
    them compiled. Its branches read buffers (the quantizers' switches, ``bn_frozen``) and its
    observers reduce to Python numbers; traced, each would break the graph inside shared code
    (``Quantizer.forward``, the observers) and recompile it for every shape, rank and grad
    mode it meets, until dynamo's recompile limit falls back to eager anyway. Eager, the
    compiled model trains with exactly the eager model's arithmetic.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.forward  # maybe a mixin's (``_FusedBn.forward``), not a QuantModule's
        if not getattr(forward, "_qat_eager", False):
            eager = torch.compiler.disable(forward)
            eager._qat_eager = True
            cls.forward = eager

    # Names of parameters that get a fake quantizer, and the channel axis of each.
    _quantized_params: ClassVar[dict[str, int]] = {"weight": 0}
    _num_inputs: ClassVar[int] = 1
    # Whether the integer simulation takes dynamic input encodings (`nn.grouped`).
    _takes_dynamic_inputs: ClassVar[bool] = False

    input_quantizers: nn.ModuleList
    output_quantizers: nn.ModuleList
    param_quantizers: nn.ModuleDict

    # -- the layer protocol: what surgery, integer eval, convert and export ask ----------------
    # (a family overrides these; nothing outside the family keeps a list of its types)
    keeps_input_grid: ClassVar[bool] = False
    """Every output value is one of the input's values or zero (max pools, ReLU): without an
    active output quantizer of its own, its output carries its input's encoding."""
    convert_as: ClassVar[str] = "op"
    """What `convert` makes of it: ``"mac"`` (integer weights, `integer_mac`; see `QuantMAC`),
    ``"lookup"`` (an integer table looked up by index) or ``"op"`` (the module itself with
    frozen quantizers, running its ``quantized_forward``)."""
    indexed_input: ClassVar[bool] = False
    """Its input is integer indices (Embedding): it never has an input encoding to find."""
    mac_output_axis: ClassVar[int] = 1
    """A MAC layer's channel axis of its input and of its accumulator (-1 for Linear)."""
    mac_weight_input_axis: ClassVar[int] = 1
    """The axis of the weight along which its input channels lie (0 for ConvTranspose)."""
    mac_float32_exact: ClassVar[bool] = False
    """``mac_op`` adds integer products exactly in float32 while every partial sum stays below
    2**24 (true of direct and GEMM kernels; not of transform-based ones): the integer MAC may
    then run in float32 over safe input-channel ranges instead of float64."""

    @property
    def output_relu(self) -> bool:
        """It applies ReLU right before its output quantizer (fused Conv+BN+ReLU, Add+ReLU)."""
        return False

    def weight_channel_axis(self, name: str = "weight") -> int | None:
        """The per-channel axis of parameter ``name`` (None: it gets no quantizer)."""
        return self._quantized_params.get(name)

    @staticmethod
    def mac_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b, *extra: Any):
        """A MAC layer's float op ``op(x, w, b)`` (linear in ``x``) with ``layer``'s
        hyperparameters; ``layer`` is the quantized module itself or `convert`'s weightless
        twin of its float type (so read only hyperparameters from it, never tensors)."""
        raise NotImplementedError(f"{layer.__class__.__name__} is not a MAC layer")

    @staticmethod
    def accumulator_channel_scale(layer: nn.Module, w_scale: torch.Tensor) -> torch.Tensor:
        """The weight scale per output channel of the accumulator (ConvTranspose with groups
        repeats it); 0-d for a per-tensor weight."""
        return w_scale

    def onnx_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Its form under ``torch.onnx.export`` in a converted model (quantizers frozen): by
        default its fake-quant ``forward``, whose quantizers become QDQ pairs. A family
        overrides it where onnxruntime fuses another form better."""
        return self(*args, **kwargs)

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        """Create the quantizer containers. ``outputs`` defaults to the inputs scheme.

        A dynamic inputs scheme quantizes the inputs of the layers that take it
        (``_takes_dynamic_inputs``: Linear) and no outputs: each consumer quantizes its own
        input at run time, as torchao's 8da4w; other layers keep float activations."""
        if inputs is not None and inputs.dynamic and not self._takes_dynamic_inputs:
            inputs = None  # dynamic activations are for the layers that simulate them (Linear)
        if outputs is None:
            outputs = None if inputs is not None and inputs.dynamic else inputs
        self.input_quantizers = nn.ModuleList(
            [Quantizer(inputs) if inputs else None for _ in range(self._num_inputs)]
        )
        self.output_quantizers = nn.ModuleList([Quantizer(outputs) if outputs else None])
        quantizers: dict[str, Quantizer | None] = {}
        for name, _ in self.named_parameters(recurse=False):
            axis = self._quantized_params.get(name)
            if axis is None or params is None:
                quantizers[name] = None
                continue
            quantizers[name] = param_quantizer(self, name, getattr(self, name), params, axis)
        self.param_quantizers = nn.ModuleDict(quantizers)

    # -- the seed protocol: autograd quant / dequant bound to the quantizers -----------------
    def input_quant(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Codes (as float integers, differentiable with STE) of input ``index``."""
        return self._ste_quant(self.input_quantizers[index], x)

    def input_dequant(self, q: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self._ste_dequant(self.input_quantizers[index], q)

    def param_quant(self, name: str) -> torch.Tensor:
        """Codes of parameter ``name`` (as float integers, differentiable with STE)."""
        return self._ste_quant(self.param_quantizers[name], getattr(self, name))

    def param_dequant(self, q: torch.Tensor, name: str) -> torch.Tensor:
        return self._ste_dequant(self.param_quantizers[name], q)

    @staticmethod
    def _ste_quant(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
        if quantizer is None:
            return x
        scale, zero_point = quantizer.encoding()
        return quantize_ste(x, scale, zero_point, quantizer.scheme)

    @staticmethod
    def _ste_dequant(quantizer: Quantizer | None, q: torch.Tensor) -> torch.Tensor:
        if quantizer is None:
            return q
        scale, zero_point = quantizer.encoding()
        return dequantize_ste(q, scale, zero_point, quantizer.scheme)

    # -- fake quantization helpers used by forward ------------------------------------------
    def fq_input(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        quantizer = self.input_quantizers[index]
        return x if quantizer is None else quantizer(x)

    def fq_output(self, y: torch.Tensor) -> torch.Tensor:
        quantizer = self.output_quantizers[0]
        return y if quantizer is None else quantizer(y)

    def fq_output_after_relu(self, y: torch.Tensor) -> torch.Tensor:
        """``fq_output(torch.relu(y))``; an output quantizer without hooks of its own takes
        `split_fake_quant.after_relu` (one gradient mask for both, not ReLU's saved output)."""
        quantizer = self.output_quantizers[0]
        if quantizer is None or must_be_called(quantizer):
            return self.fq_output(torch.relu(y))
        return after_relu(quantizer, y)

    def fq_param(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fake-quantized parameter ``name`` (or ``value`` standing in for it, e.g. BN-folded)."""
        value = getattr(self, name) if value is None else value
        quantizer = self.param_quantizers[name] if name in self.param_quantizers else None  # noqa: SIM401
        return value if quantizer is None or value is None else quantizer(value)

    # -- integer mode ----------------------------------------------------------------------
    def quantized_forward(self, *inputs: QTensor) -> QTensor:
        """Integer simulation of ``forward``; see each family."""
        raise NotImplementedError(f"{type(self).__name__} has no integer simulation")

    def runs_integer(self, inputs: Sequence[Any]) -> bool:
        """True where ``forward(*inputs)`` runs the integer simulation (see `integer_in_eval`)."""
        if not integer_eval_allowed(self):
            return False
        tensors = tensor_inputs(inputs)
        if not tensors or not all(
            isinstance(t, torch.Tensor) and t.dtype in INTEGER_INPUT_DTYPES for t in tensors
        ):
            return False
        sources = [self.input_encoding(i) for i in range(len(tensors))]
        if any(s is None or not _ready(s) or s.encoding()[0].dim() > 0 for s in sources):
            return False
        if any(s.scheme.dynamic for s in sources) and not self._takes_dynamic_inputs:
            return False
        if "weight" in self.param_quantizers and self.param_quantizers["weight"] is None:
            return False  # a float weight: there is no integer form
        return all(_ready(q) for q in self.quantizers())

    def integer_forward(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        """``forward`` through `quantized_forward`: each input quantized to the encoding it has
        (its own input quantizer's or its producer's), the result dequantized (float32, or
        float64 for a float64 input, as `convert`'s modules return it)."""
        tensors = tensor_inputs(inputs)
        qs = [quantize_linked(self.input_encoding(i), t) for i, t in enumerate(tensors)]
        args = (qs,) if len(inputs) == 1 and isinstance(inputs[0], list | tuple) else qs
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        result = self.quantized_forward(*args, **kwargs)  # float where there is no output grid
        if isinstance(result, QTensor):  # carries its codes to the next layer (`eval_cache`)
            return dequantize_linked(result, dtype)
        return result.to(dtype)

    def input_qtensor(self, q: QTensor, index: int = 0) -> QTensor:
        """Input ``index`` under this module's own input encoding, where it has one."""
        return requantize(q, self.input_quantizers[index])

    # -- where an input's encoding lives -------------------------------------------------------
    def set_input_source(self, index: int, quantizer: Quantizer) -> None:
        """Record the producer's output quantizer that owns input ``index``'s encoding.

        Model surgery calls this when it removes a redundant input quantizer. It is a plain
        reference, not a submodule: the producer owns (and checkpoints) that quantizer, and
        surgery records the reference again whenever it rebuilds a model.
        """
        self.__dict__.setdefault("_input_sources", {})[index] = quantizer

    def input_encoding(self, index: int = 0) -> Quantizer | None:
        """The quantizer whose encoding input ``index`` has: the module's own, or the
        producer's recorded by surgery; None where unknown (a float input)."""
        own = self.input_quantizers[index]
        if own is not None:
            return own
        return self.__dict__.get("_input_sources", {}).get(index)

    def fq_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias as integer mode and the exported model use it: rounded to int32 codes at
        the accumulator scale ``s_in * s_w`` (straight-through gradient).

        Without this, fake quant adds the float bias and the integer model the rounded one,
        and at low bit widths that one-code difference flips outputs. Left float while either
        encoding is unknown, uncalibrated or switched off.
        """
        source = self.input_encoding(0)
        weight = self.param_quantizers["weight"] if "weight" in self.param_quantizers else None  # noqa: SIM401
        ready = bias is not None and source is not None and weight is not None
        if not ready or not all(_ready(q) for q in (source, weight)):
            return bias
        if source.scheme.dynamic or weight.scheme.per_group:
            return bias  # no one accumulator scale: the bias stays float (`nn.grouped`)
        s_in, _ = source.encoding()
        s_w, _ = weight.encoding()
        if s_in.dim() > 0:
            return bias
        acc_scale = s_in.double() * self.accumulator_channel_scale(self, s_w.double())
        codes = torch.round(bias.detach().double() / acc_scale).clamp(-(2**31), 2**31 - 1)
        rounded = (codes * acc_scale).to(bias.dtype)
        return bias + (rounded - bias).detach()

    # -- quantizers as a group ----------------------------------------------------------------
    def quantizers(self) -> Iterator[Quantizer]:
        """Every quantizer this module owns (not those of submodules' submodules)."""
        for container in (self.input_quantizers, self.output_quantizers):
            yield from (q for q in container if q is not None)
        yield from (q for q in self.param_quantizers.values() if q is not None)

    @contextmanager
    def compute_encodings(self) -> Iterator[QuantModule]:
        """Observe every quantizer inside the block; fix the encodings on exit."""
        with ExitStack() as stack:
            for quantizer in self.quantizers():
                stack.enter_context(quantizer.compute_encodings())
            yield self

    # -- going in and coming out -------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
    ) -> QuantModule:
        """A quantized twin of ``module`` sharing its parameters, buffers and submodules."""
        qmodule = cls.__new__(cls)
        nn.Module.__init__(qmodule)
        # Share the tensors, don't copy them: an optimizer built on the float model still
        # trains these. Containers (hook dicts and the like) are copied, so a hook registered
        # on one module does not fire on the other.
        qmodule.__dict__.update(
            {
                k: (copy.copy(v) if isinstance(v, dict) else v)
                for k, v in module.__dict__.items()
                if k not in ("_parameters", "_buffers", "_modules")
            }
        )
        qmodule._parameters = dict(module._parameters)
        qmodule._buffers = dict(module._buffers)
        qmodule._modules = dict(module._modules)
        qmodule.training = module.training
        qmodule._init_quantizers(QuantScheme.from_any(inputs), QuantScheme.from_any(params))
        return qmodule

    def to_float(self) -> nn.Module:
        """The float module again, with the same (trained) parameters; quantizers dropped."""
        float_type = next(
            b
            for b in type(self).__mro__[1:]
            if issubclass(b, nn.Module) and not issubclass(b, QuantModule)
        )
        module = float_type.__new__(float_type)
        module.__dict__.update(
            {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        )
        module._modules = {
            k: v
            for k, v in self._modules.items()
            if k not in ("input_quantizers", "output_quantizers", "param_quantizers")
        }
        module._parameters = dict(self._parameters)
        module._buffers = dict(self._buffers)
        return module
