"""`export_onnx`: the converted model as a QDQ ONNX graph that onnxruntime runs in integers.

The graph comes from torch's own exporter (``torch.onnx.export(dynamo=True)``): each converted
module emits, under export, ``DequantizeLinear`` of its integer initializers (weights int8 or
INT4 per channel on axis 0, bias int32 at ``s_in * s_w``), the float op, and
``QuantizeLinear -> DequantizeLinear`` where a quantizer owns the tensor. Each activation is
quantized once, by its producer, so onnxruntime's graph optimizer fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` and ``DQ -> Gemm/MatMul -> Q`` into ``QGemm`` /
``QLinearMatMul``.

4-bit (and narrower) weights are INT4/UINT4 initializers (opset 21): the export casts the
int8 codes to INT4 and the exporter's constant folder (onnxscript) turns the cast into a packed
4-bit initializer. If onnxruntime cannot load that model, the export falls back to int8
containers and warns.

Inputs are named after the ``forward``'s arguments, outputs ``logits`` (or the model's own
names); the schemes, the qat_lightning version and the caller's ``metadata`` (e.g. metrics)
go in the model's ``metadata_props`` (see `qat_lightning.export.onnx_io`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qat_lightning.export._files import ExportError, atomic_paths
from qat_lightning.export.convert import convert, is_converted
from qat_lightning.export.example_input import (
    ExampleInput,
    bind,
    dynamic_axes,
    dynamic_shapes,
    leaves,
    ordered,
)
from qat_lightning.export.grouped import check_exportable
from qat_lightning.export.modules import IntegerEmbedding, IntegerLayer
from qat_lightning.export.onnx_io import INPUTS_KEY, WEIGHTS_KEY, finish_inputs, metadata_props
from qat_lightning.export.onnx_io import output_names as returned_names
from qat_lightning.export.onnx_trace import note_constants, root_cause, trace_dynamic
from qat_lightning.export.qdq import KEEP_NODE, ONNX_INT4, ONNX_UINT4, packs_to_int4
from qat_lightning.export.report import layer_report

DEFAULT_OPSET = 21  # INT4 / 16-bit QuantizeLinear; onnxruntime >= 1.18 runs it
WEIGHT_FORMS = ("exact", "int8")  # export_onnx(weights=...)

log = logging.getLogger(__name__)


@contextmanager
def _onnx_constants(model: nn.Module, int4: bool, weights: str) -> Iterator[None]:
    """Let each integer module precompute what its export forward needs as constants."""
    modules = [m for m in model.modules() if isinstance(m, (IntegerLayer, IntegerEmbedding))]
    try:
        for module in modules:
            module.prepare_onnx(int4, weights=weights)
        yield
    finally:
        for module in modules:
            module.finish_onnx()


def _has_int4(model: nn.Module) -> bool:
    return any(
        packs_to_int4(m.weight_scheme)
        for m in model.modules()
        if isinstance(m, (IntegerLayer, IntegerEmbedding))
    )


def _fold_int4_casts(program) -> None:
    """Fold ``Cast(int8 initializer, to=INT4)`` into packed 4-bit initializers."""
    import onnx_ir as ir
    import onnxscript.optimizer

    def should_fold(node) -> bool:
        to = node.attributes.get("to")
        return node.op_type == "Cast" and to is not None and to.as_int() in (ONNX_INT4, ONNX_UINT4)

    graph = program.model.graph
    onnxscript.optimizer.fold_constants(
        program.model,
        input_size_limit=2**62,
        output_size_limit=2**62,
        should_fold=should_fold,
    )
    onnxscript.optimizer.remove_unused_nodes(program.model)
    left = [n.name for n in graph if should_fold(n)]
    if left:
        raise ExportError(f"export_onnx: could not fold the INT4 casts {left[:3]}")
    for value in list(graph.initializers.values()):
        value.metadata_props.pop(onnxscript.optimizer.FOLDED_FROM_KEY, None)
        # Name a folded 4-bit weight after its scale ("fc.weight_scale" -> "fc.weight").
        uses = [(n, i) for n, i in value.uses() if n.op_type == "DequantizeLinear"]
        scale = uses[0][0].inputs[1].name if uses else ""
        if value.const_value.dtype in (ir.DataType.INT4, ir.DataType.UINT4) and scale.endswith(
            "_scale"
        ):
            name = scale.removesuffix("_scale") + ("" if uses[0][1] == 0 else "_zero_point")
            if name not in graph.initializers:
                value.name = name


def _trace(
    model: nn.Module,
    example: ExampleInput,
    shapes: dict[str, Any] | None,
    opset: int,
    int4: bool,
    weights: str,
    input_names: Sequence[str],
    output_names: Sequence[str] | None,
    real_values: bool = False,
) -> onnx.ModelProto:
    import onnxscript.optimizer

    real = contextlib.nullcontext()
    if real_values:  # see `_trace_real_values`
        import torch._functorch.config as functorch_config

        real = functorch_config.patch(fake_tensor_propagate_real_tensors=True)
    with _onnx_constants(model, int4, weights), warnings.catch_warnings(), real:
        warnings.simplefilter("ignore")  # the exporter's own chatter about torch.export
        program = torch.onnx.export(
            model,
            example.args,
            kwargs=example.kwargs or None,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            input_names=list(input_names),
            output_names=list(output_names) if output_names else None,
            optimize=False,
            verbose=False,
        )
    # What optimize=True does, except that the nodes marked KEEP_NODE stay (see
    # `onnx_bias_scale`).
    onnxscript.optimizer.optimize_ir(
        program.model, should_fold=lambda node: False if KEEP_NODE in node.metadata_props else None
    )
    if int4:
        _fold_int4_casts(program)
    for node in program.model.graph.all_nodes():
        # The exporter's debug metadata: stack traces with local paths, ~2% of a resnet18.
        node.metadata_props.clear()
    proto = program.model_proto
    # torch.export's graph signature (a line per lifted buffer: 180 KB on mobilenet_v2, 7 % of
    # its int8 file) and the shapes of intermediate values: no runtime reads either, and
    # onnxruntime infers the shapes itself.
    keep = [p for p in proto.graph.metadata_props if not p.key.startswith("pkg.torch.export.")]
    del proto.graph.metadata_props[:]
    proto.graph.metadata_props.extend(keep)
    del proto.graph.value_info[:]
    return proto


def _with_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})
    return proto


def _ort_loads(path: Path) -> Exception | None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        return error
    return None


def _prepared(model: nn.Module, example: ExampleInput) -> tuple[nn.Module, ExampleInput]:
    if not is_converted(model):
        model = convert(model)
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices - {"cpu"}:
        model = copy.deepcopy(model).cpu()
    example = example.map_tensors(lambda t: t.detach().cpu())
    if example.batch_size() == 1:
        # torch.export specializes a size-1 dimension; trace with 2 rows to keep batch dynamic.
        example = example.map_tensors(lambda t: torch.cat([t, t]) if t.dim() and len(t) == 1 else t)
    return model.eval(), example


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    int4: bool = True,
    weights: str = "exact",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a QDQ ONNX model that onnxruntime runs with integer kernels.

    Args:
        model: a calibrated QAT model (converted here) or the output of `convert`.
        example_input: the arguments of one ``forward`` call: a tensor (the only argument),
            a tuple or list (positional), a dict with str keys (keyword, e.g. a tokenizer's
            ``{"input_ids": ..., "attention_mask": ...}``), or an `ExampleInput` (both).
            Each tensor becomes a graph input, named after its ``forward`` parameter (the
            dict key), with its dtype (token ids stay int64 and are never quantized).
            ``None``, bool, int and float arguments are baked into the graph as constants
            (one warning names them; the metadata records them); anything else is refused.
        path: the ``.onnx`` file to write (atomically; its directory is created).
        opset: ONNX opset; default 21 (INT4 and 16-bit QuantizeLinear need 21).
        dynamic_batch: make dimension 0 (``batch``) dynamic on every input whose first
            dimension is that of the first tensor.
        dynamic_sequence: with ``dynamic_batch``, also make dimension 1 (``sequence``) of
            rank >= 2 integer and bool inputs dynamic (token ids, attention masks); if the
            model fixes it, the export warns and keeps the example's length.
        int4: store 4-bit (and narrower) weights as INT4 initializers; falls back to int8 with
            a warning if onnxruntime cannot load the INT4 model.
        weights: how 8-bit signed weights against 8-bit activations are stored.
            ``"exact"`` (default): where a layer's codes go beyond +-64, as uint8 (codes and
            zero point + 128, the same real values), so that onnxruntime runs its u8 x u8
            kernels, which compute the integer model exactly on every x86 CPU. ``"int8"``:
            as int8, for onnxruntime's u8 x s8 kernels: about 1.6x faster on a CPU with VNNI
            (AVX-512 VNNI, AVX-VNNI) or on ARM, where they are exact too; on an x86 CPU
            without VNNI (AVX2 only) they saturate at int16 and are not exact. The choice is
            recorded in the file's metadata (``qat_lightning.weights``).
        input_names / output_names: graph input and output names; default: the parameter
            names of ``model.forward`` (``*args`` -> ``args_0``, ...), and ``logits`` for one
            output tensor (the keys of a dict, the fields of a namedtuple, ``output_<i>`` for
            a tuple).
        metadata: more ``metadata_props`` entries, each value stored as JSON, e.g.
            ``{"metrics": {"val_acc": 0.97}}``; ``qat_lightning.version``,
            ``qat_lightning.schemes`` and ``qat_lightning.inputs`` (each ``forward``
            parameter: its graph input's dtype and shape, or the constant baked in) are always
            written.

    Returns:
        The path written.

    Raises:
        NotCalibratedError: the QAT model is not calibrated.
        ExportError: the directory is not writable or the exporter failed (nothing is left
            half-written).
        ValueError: ``example_input`` is not one of the forms above or does not fit
            ``forward``, or a ``metadata`` key or value cannot be stored.

    Example:
        >>> export_onnx(qat_model, torch.randn(1, 3, 224, 224), "model_int8.onnx")
        >>> export_onnx(qat_bert, {"input_ids": ids, "attention_mask": mask}, "bert.onnx")
    """
    if weights not in WEIGHT_FORMS:
        raise ValueError(
            f"export_onnx(weights={weights!r}) is invalid: allowed one of "
            f"{', '.join(repr(w) for w in WEIGHT_FORMS)}"
        )
    path = Path(path)
    example = ExampleInput.parse(example_input, "export_onnx")
    converted, example = _prepared(model, example)
    check_exportable(converted, "export_onnx")  # a layer with no ONNX form: ExportError
    bound = bind(converted, example, "export_onnx")
    example = ordered(bound, example)
    arguments = leaves(bound)
    tensors = [(name, v) for name, _, v in arguments if torch.is_tensor(v)]
    if input_names is None:
        input_names = [name for name, _ in tensors]
    elif len(input_names) != len(tensors):
        raise ValueError(
            f"export_onnx(input_names={list(input_names)!r}) is invalid: the example has "
            f"{len(tensors)} tensor arguments ({', '.join(n for n, _ in tensors)}); allowed "
            "one name each"
        )
    note_constants(arguments)
    axes = dynamic_axes(tensors, dynamic_batch, dynamic_sequence)
    props = metadata_props(converted, metadata)
    props[WEIGHTS_KEY] = json.dumps(weights)
    opset = DEFAULT_OPSET if opset is None else opset
    use_int4 = int4 and _has_int4(converted)
    if use_int4 and opset < 21:
        warnings.warn(
            f"export_onnx: opset={opset} has no INT4; 4-bit weights are written as int8",
            stacklevel=2,
        )
        use_int4 = False
    floats = layer_report(converted)["float_layers"]
    if floats:
        warnings.warn(
            f"export_onnx: {len(floats)} layer(s) are left float and export as float: "
            f"{', '.join(n or '(the model itself)' for n in floats[:8])}"
            f"{' ...' if len(floats) > 8 else ''}",
            stacklevel=2,
        )
    with atomic_paths([path], "export_onnx") as (temp,):
        try:
            if output_names is None:
                with torch.no_grad():
                    outputs = converted(*example.args, **example.kwargs)
                output_names = returned_names(outputs, taken=input_names)

            def trace(int4: bool):
                return lambda shapes, real: _trace(
                    converted,
                    example,
                    shapes,
                    opset,
                    int4,
                    weights,
                    input_names,
                    output_names,
                    real,
                )

            proto, axes, real = trace_dynamic(dict(tensors), bound, axes, trace(use_int4))
            entries = finish_inputs(proto, arguments, input_names, axes)
            props[INPUTS_KEY] = json.dumps(entries, separators=(",", ":"))
            onnx.save_model(_with_metadata(proto, props), temp)
            error = _ort_loads(temp) if use_int4 else None
            if error is not None:
                message = (
                    f"export_onnx: onnxruntime cannot run INT4 weights ({error}); writing "
                    "4-bit weights in int8 containers instead"
                )
                log.warning(message)
                warnings.warn(message, stacklevel=2)
                proto = trace(False)(None if real else dynamic_shapes(bound, axes), real)
                finish_inputs(proto, arguments, input_names, axes)
                onnx.save_model(_with_metadata(proto, props), temp)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(
                f"export_onnx: exporting {type(model).__name__} to {str(path)!r} failed: "
                f"{root_cause(error)}"
            ) from error
    return path
