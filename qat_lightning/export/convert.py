"""`convert`: a calibrated QAT model -> an integer model (BN folded, integer weights).

The converted model is a deep copy in which every quantized module is replaced by its
converted form (`IntegerLayer`, `IntegerEmbedding`, `QuantizedOp`); float modules stay as
they are. Its forward is the integer simulation of the QAT model, and it is what
`export_onnx` and `save_quantized` write.

A module whose input quantizer is ``None`` takes its input already quantized by a producer
(model surgery removes the redundant quantizer so each activation is quantized once). To turn
that float input back into codes, the converted module keeps a frozen copy of the producer's
encoding; the producer is found on the model's ``torch.fx`` graph, looking through ops that
keep values on the grid (flatten, reshape, dropout, ..., and quantized modules whose
``keeps_input_grid`` says so: max pools, ReLU).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat_lightning.export.grouped import convert_grouped
from qat_lightning.export.modules import (
    IntegerEmbedding,
    IntegerLayer,
    WeightOnlyLayer,
    weightless_twin,
)
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.qdq import on_grid_for_onnx, qdq_or_identity
from qat_lightning.export.rnn import convert_recurrent
from qat_lightning.nn.base import QuantModule
from qat_lightning.quant import Quantizer

# The ops that keep values on their input's grid: the same list surgery prunes by.
from qat_lightning.surgery.graph import GRID_FUNCTIONS, GRID_METHODS, GRID_MODULES
from qat_lightning.surgery.rewrite_check import pending_checks


class ActivationOnlyOp(QuantizedOp):
    """A MAC layer with float weights and quantized activations (``params=None``):
    fake-quantized input and output around the family's float op on the (BN-folded) float
    weight, in eager mode and in ONNX (``Q/DQ`` around a float Gemm / Conv)."""

    def __init__(self, module: QuantModule, borrowed: list[Quantizer | None]) -> None:
        weight, bias = module.weight_and_bias()
        super().__init__(module, borrowed)
        self.op = weightless_twin(module)
        self.family = type(module)
        self.relu = module.output_relu
        self.register_buffer("float_weight", weight.detach().clone())
        self.register_buffer("float_bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor, *extra: Any) -> torch.Tensor:
        own = self.module.input_quantizers[0]
        if own is not None:
            x = own(x)
        elif torch.onnx.is_in_onnx_export():
            x = on_grid_for_onnx(self.borrowed_encodings[0], x)
        y = self.family.mac_op(self.op, x, self.float_weight, self.float_bias, *extra)
        y = F.relu(y) if self.relu else y
        return qdq_or_identity(self.module.output_quantizers[0], y)

    def extra_repr(self) -> str:
        return "float weight, quantized activations"


class NotCalibratedError(RuntimeError):
    """A quantizer that takes part in the model has no encoding yet."""


CONVERTED_TYPES = (IntegerLayer, IntegerEmbedding, QuantizedOp)


def _active(quantizer: Quantizer | None) -> bool:
    return quantizer is not None and bool(quantizer.fake_quant_enabled)


def _owner_and_role(path: str) -> tuple[str, str]:
    """``"layer1.conv.input_quantizers.0"`` -> (``"layer1.conv"``, ``"input 0"``)."""
    for container, role in (
        (".input_quantizers.", "input"),
        (".output_quantizers.", "output"),
        (".param_quantizers.", "param"),
    ):
        owner, sep, slot = ("." + path).rpartition(container)
        if sep:
            return owner[1:] or "<root>", f"{role} {slot}"
    return path or "<root>", "quantizer"


def check_calibrated(model: nn.Module) -> None:
    """Raise `NotCalibratedError` naming the first layer with an uncalibrated quantizer.

    A quantizer is uncalibrated when it is enabled (fake quant or observer on) and its
    ``initialized`` flag is 0: it never saw data.
    """
    for path, module in model.named_modules():
        if not isinstance(module, Quantizer) or bool(module.initialized):
            continue
        if bool(module.fake_quant_enabled) or bool(module.observer_enabled):
            owner, role = _owner_and_role(path)
            layer = model.get_submodule(owner) if owner != "<root>" else model
            raise NotCalibratedError(
                f"convert: layer {owner!r} ({type(layer).__name__}) has an uncalibrated {role} "
                "quantizer (initialized=0): run calibration batches through the model inside "
                "compute_encodings() (or let QATCallback calibrate) before converting"
            )


def _quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    """Top-level quantized modules (a quantized module's own children are not visited)."""
    for name, child in model.named_children():
        if isinstance(child, QuantModule):
            yield name, child
        elif not isinstance(child, CONVERTED_TYPES):
            for sub, module in _quant_modules(child):
                yield f"{name}.{sub}", module


class _LeafTracer(fx.Tracer):
    """Traces down to quantized modules, which stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantModule, *CONVERTED_TYPES)) or super().is_leaf_module(m, qualname)


def _flat_nodes(args: tuple) -> list:
    flat: list = []
    for arg in args:
        flat.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return flat


def _source_encoding(node, modules: dict[str, nn.Module]) -> Quantizer | None:
    """The quantizer whose grid the value of ``node`` lies on, or None."""
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, QuantModule):
                out = module.output_quantizers[0] if len(module.output_quantizers) else None
                if _active(out):
                    return out
                if not module.keeps_input_grid:
                    return None
                if _active(module.input_quantizers[0]):
                    return module.input_quantizers[0]
            elif not isinstance(module, GRID_MODULES):
                return None
        elif not (
            (node.op == "call_function" and node.target in GRID_FUNCTIONS)
            or (node.op == "call_method" and node.target in GRID_METHODS)
        ):
            return None
        node = node.args[0] if node.args else None
    return None


def find_producers(model: nn.Module) -> dict[str, list[Quantizer | None]]:
    """For each quantized module lacking an input quantizer: the producer's quantizer per
    input slot (None where none was found).

    Model surgery records each pruned input's producer (`QuantModule.input_encoding`); those
    records are used as they are (also where other modules lack them). Only modules quantized
    by hand, without records, are found by tracing the model. Modules whose input is indices
    (``indexed_input``: Embedding) need no encoding.
    """
    needy = {
        name: m
        for name, m in _quant_modules(model)
        if not m.indexed_input and any(not _active(q) for q in m.input_quantizers)
    }
    recorded = {
        name: [
            None if q is not None else m.input_encoding(i)  # (a switched-off own: trace)
            for i, q in enumerate(m.input_quantizers)
        ]
        for name, m in needy.items()
    }
    if all(
        p is not None
        for name, m in needy.items()
        for q, p in zip(m.input_quantizers, recorded[name], strict=True)
        if not _active(q)
    ):
        return recorded
    try:
        graph = model.graph if isinstance(model, fx.GraphModule) else _LeafTracer().trace(model)
    except Exception as error:  # untraceable: fall back to module order
        warnings.warn(
            f"convert: the model does not trace with torch.fx ({type(error).__name__}: "
            f"{error}); input encodings without a record of surgery are taken from the "
            "previous quantized module",
            stacklevel=3,
        )
        return _with_records(_producers_by_order(model, needy), recorded)
    modules = dict(model.named_modules())
    found: dict[str, list[Quantizer | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in needy:
            continue
        module = needy[node.target]
        inputs = _flat_nodes(node.args)
        producers = [
            None if _active(own) or i >= len(inputs) else _source_encoding(inputs[i], modules)
            for i, own in enumerate(module.input_quantizers)
        ]
        if node.target in found:  # called again: keep only the encodings every call shares
            producers = [
                p if p is q else None for p, q in zip(producers, found[node.target], strict=True)
            ]
        found[node.target] = producers
    return _with_records(found, recorded)


def _with_records(
    found: dict[str, list[Quantizer | None]], recorded: dict[str, list[Quantizer | None]]
) -> dict[str, list[Quantizer | None]]:
    """``found`` with surgery's records taking precedence, slot by slot."""
    for name, slots in recorded.items():
        guessed = found.get(name, [None] * len(slots))
        found[name] = [r if r is not None else g for r, g in zip(slots, guessed, strict=True)]
    return found


def _producers_by_order(
    model: nn.Module, needy: dict[str, QuantModule]
) -> dict[str, list[Quantizer | None]]:
    found: dict[str, list[Quantizer | None]] = {}
    previous: Quantizer | None = None
    for name, module in _quant_modules(model):
        if name in needy:
            found[name] = [None if _active(q) else previous for q in module.input_quantizers]
        out = module.output_quantizers[0] if len(module.output_quantizers) else None
        if _active(out):
            previous = out
    return found


def _convert_module(name: str, module: QuantModule, borrowed: list[Quantizer | None]) -> nn.Module:
    """What ``module`` becomes, as its ``convert_as`` says (integer MAC, integer table, op)."""
    grouped = convert_grouped(name, module, borrowed)  # per-group weights, dynamic inputs
    if grouped is not None:
        return grouped
    quantizers = dict(module.param_quantizers.items())
    weight_q = quantizers.get("weight")
    has_input = [
        _active(own) or b is not None
        for own, b in zip(module.input_quantizers, borrowed, strict=True)
    ]
    form = module.convert_as
    if form == "recurrent":  # LSTM / GRU / RNN: integer weight matrices (`export.rnn`)
        return convert_recurrent(module, borrowed)
    if form == "lookup" and _active(weight_q):
        return IntegerEmbedding.from_quant(module)
    mac = form == "mac"
    if mac and _active(weight_q) and all(has_input):
        own = module.input_quantizers[0]
        encoding = own if _active(own) else borrowed[0]
        if encoding.scale.dim() == 0:
            return IntegerLayer.from_quant(module, borrowed[0])
    float_activations = not any(has_input) and not _active(module.output_quantizers[0])
    if mac and _active(weight_q) and float_activations:  # weight-only: inputs=None
        return WeightOnlyLayer.from_quant(module)
    if mac and weight_q is None and all(has_input):  # activation-only: params=None
        return ActivationOnlyOp(module, borrowed)
    op = QuantizedOp(module, borrowed)
    reason = None
    if not all(has_input):
        reason = "an input has no encoding (its producer is float, or differs between calls)"
    elif mac and not _active(weight_q):
        reason = "its weight is float"
    elif mac:
        reason = "its input encoding is per channel"
    if reason is not None:
        op.integer_mode.fill_(0)
        warnings.warn(
            f"convert: layer {name!r} ({type(module).__name__}) runs in fake quant (float "
            f"arithmetic): {reason}",
            stacklevel=3,
        )
    return op


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """A deep copy of a calibrated QAT model that computes with integers.

    BatchNorm of fused layers is folded; every quantized Linear/Conv/ConvTranspose/Embedding
    stores its weight as integer codes (int8; 4 bits and fewer packed two per byte in a
    uint8 buffer) with per-channel scales and int32 bias; other quantized modules keep their
    (frozen) encodings. The forward quantizes each float input, computes on codes exactly
    and returns the dequantized output: the integer simulation of the QAT model.

    Args:
        model: the QAT model (quantized by ``quantize_model`` and calibrated), or its
            ``torch.compile`` wrapper, or a module whose methods were compiled in place (as
            Lightning's ``Trainer.fit(torch.compile(module))`` leaves it): the result is
            then the converted eager model.

    Returns:
        The converted model, in eval mode. The input model is not changed.

    Raises:
        NotCalibratedError: a quantizer is enabled but has never seen data (names the layer).

    Example:
        >>> int_model = convert(qat_model)
        >>> y = int_model(x)   # == the integer simulation of qat_model
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod  # torch.compile's wrapper: convert the module it compiles
    check_calibrated(model)
    converted = copy.deepcopy(model).eval()
    _drop_compiled_methods(converted)
    _drop_pending_checks(converted)
    if isinstance(converted, QuantModule):
        converted = nn.Sequential(converted)  # a bare layer: give it a parent to replace in
    producers = find_producers(converted)
    for name, module in list(_quant_modules(converted)):
        borrowed = producers.get(name, [None] * len(module.input_quantizers))
        _set_submodule(converted, name, _convert_module(name, module, borrowed))
    for module in list(converted.modules()):  # containers drop what their children now hold
        finish = getattr(module, "finish_convert", None)
        if callable(finish):
            finish()
    return converted.eval()


def _drop_compiled_methods(model: nn.Module) -> None:
    """Remove instance-level compiled methods from ``model`` (a deep copy) and its children.

    Lightning's ``Trainer.fit(torch.compile(module))`` replaces the module's ``forward`` and
    ``*_step`` by compiled wrappers of the *original* object's bound methods, so a deep copy
    would still run the QAT model, not the converted one. The class's methods take over.
    """
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable"):
                del module.__dict__[key]
        if getattr(module, "_compiler_ctx", None) is not None:
            module._compiler_ctx = None  # Lightning's record of the compiled methods


def _drop_pending_checks(model: nn.Module) -> None:
    """A rewritten block that never ran since `quantize_model` was not checked against its own
    forward (`surgery.rewrite_check`); the converted model runs its graph, and says so."""
    pending = pending_checks(model)
    for _, check in pending:
        check.gm.__dict__.pop("forward", None)
    if pending:
        names = ", ".join(repr(name) for name, _ in pending[:5])
        warnings.warn(
            f"convert: {len(pending)} rewritten block(s) never ran since quantize_model ({names}"
            f"{' ...' if len(pending) > 5 else ''}), so their graphs were never checked against "
            "their own forward: run a batch through the QAT model before converting",
            stacklevel=3,
        )


def is_converted(model: nn.Module) -> bool:
    """True if ``model`` holds no unconverted quantized module."""
    return next(_quant_modules(model), None) is None
