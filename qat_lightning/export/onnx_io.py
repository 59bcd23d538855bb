"""What an exported ONNX file says about itself: input and output names, and metadata.

- Inputs are named after the parameters of the model's ``forward`` (``forward(self, x)`` ->
  ``x``; ``*args`` -> ``args_0``, ``args_1``, ...; a keyword argument by its key), one per
  tensor argument, with dynamic ``batch`` (and ``sequence``) dimensions.
- Outputs: one tensor is ``logits``; a dict or namedtuple keeps its keys / fields; a tuple or
  list of tensors is ``output_0``, ``output_1``, ...; nested containers join the parts with
  ``.``, in the order torch's exporter flattens them.
- ``metadata_props``: ``qat_lightning.version``, ``qat_lightning.schemes`` (JSON: each
  distinct scheme and the layers that use it, per role), ``qat_lightning.inputs`` (JSON: each
  ``forward`` parameter in order, its graph input's dtype and shape or the constant baked in,
  see `finish_inputs`), ``qat_lightning.weights`` (JSON: ``"exact"`` or ``"int8"``, how 8-bit
  weights are stored, see `export_onnx`) and any caller-given entries, each value as JSON
  (e.g. ``metrics``: ``{"val_acc": 0.97}``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qat_lightning.export.modules import IntegerEmbedding, IntegerLayer
from qat_lightning.quant import Quantizer, QuantScheme

VERSION_KEY = "qat_lightning.version"
SCHEMES_KEY = "qat_lightning.schemes"
INPUTS_KEY = "qat_lightning.inputs"
WEIGHTS_KEY = "qat_lightning.weights"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _leaf_names(value: Any, prefix: str) -> list[str]:
    def join(part: str) -> str:
        return f"{prefix}.{part}" if prefix else part

    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _leaf_names(v, join(str(k)))]
    if _is_namedtuple(value):
        return [n for k in value._fields for n in _leaf_names(getattr(value, k), join(k))]
    if isinstance(value, (tuple, list)):
        return [n for i, v in enumerate(value) for n in _leaf_names(v, join(f"output_{i}"))]
    if isinstance(value, torch.Tensor):
        return [prefix]
    return []  # not a graph output (None, numbers): the exporter drops it


def output_names(outputs: Any, taken: Sequence[str] = ()) -> list[str]:
    """Names of the graph outputs for the value ``forward`` returned (see the module doc);
    a name among ``taken`` (the input names) gets the suffix ``_output``."""
    names = ["logits"] if isinstance(outputs, torch.Tensor) else _leaf_names(outputs, "")
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    return [f"{n}_output" if n in taken else n for n in names]


def _owner(path: str) -> str:
    """``"layer1.0.conv1.input_quantizers.0"`` -> ``"layer1.0.conv1"`` (the layer's name)."""
    parts = path.split(".")
    for role in ("input_quantizers", "output_quantizers", "param_quantizers"):
        if role in parts:
            parts = parts[: parts.index(role)]
            break
    if parts and parts[-1] == "module":  # a QuantizedOp's wrapped module
        parts = parts[:-1]
    return ".".join(parts) or "<model>"


def scheme_summary(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Each distinct scheme of a converted model and the layers that use it.

    Returns:
        ``{"params": [{"scheme": {...}, "layers": [...]}, ...], "activations": [...]}``:
        weight schemes, and the schemes of activation (input and output) quantizers.
    """
    groups: dict[str, dict[str, dict[str, Any]]] = {"params": {}, "activations": {}}

    def add(role: str, scheme: QuantScheme, layer: str) -> None:
        fields = scheme.to_dict()
        entry = groups[role].setdefault(
            json.dumps(fields, sort_keys=True), {"scheme": fields, "layers": []}
        )
        if layer not in entry["layers"]:
            entry["layers"].append(layer)

    for name, module in model.named_modules():
        if isinstance(module, (IntegerLayer, IntegerEmbedding)):
            add("params", module.weight_scheme, name or "<model>")
        elif isinstance(module, Quantizer) and ".borrowed_encodings." not in f".{name}.":
            role = "params" if "param_quantizers" in name.split(".") else "activations"
            add(role, module.scheme, _owner(name))
    return {role: list(entries.values()) for role, entries in groups.items()}


def metadata_props(model: nn.Module, metadata: dict[str, Any] | None) -> dict[str, str]:
    """The ``metadata_props`` of the exported file (see the module doc).

    Raises:
        ValueError: a ``metadata`` key is not a string, clashes with a ``qat_lightning.*``
            key, or its value is not JSON-serialisable.
    """
    import qat_lightning

    props = {
        VERSION_KEY: qat_lightning.__version__,
        SCHEMES_KEY: json.dumps(scheme_summary(model), separators=(",", ":")),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or key.startswith("qat_lightning."):
            raise ValueError(
                f"export_onnx(metadata={{{key!r}: ...}}) is invalid: allowed string keys not "
                "starting with 'qat_lightning.' (those are written by the export)"
            )
        try:
            props[key] = json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"export_onnx(metadata={{{key!r}: {value!r}}}) is invalid: allowed a "
                f"JSON-serialisable value ({error})"
            ) from error
    return props


def read_metadata(props: dict[str, str]) -> dict[str, Any]:
    """The inverse of `metadata_props`: JSON values decoded (a value another tool wrote that
    is not JSON stays a string)."""
    decoded: dict[str, Any] = {}
    for key, text in props.items():
        try:
            decoded[key] = json.loads(text) if key != VERSION_KEY else text
        except json.JSONDecodeError:
            decoded[key] = text
    return decoded


def _rename_dims(values: Sequence[Any], mapping: dict[str, str]) -> None:
    """Rename symbolic dimensions (also inside expressions such as ``s0*s1``)."""
    if not mapping:
        return
    names = "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)({names})(?!\w)")
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(lambda m: mapping[m[1]], dim.dim_param)


def _dims(value: Any) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value.type.tensor_type.shape.dim
    ]


def _plain(value: Any) -> bool:
    return isinstance(value, (type(None), bool, int, float, str))


def finish_inputs(
    proto: Any,
    arguments: list[tuple[str, int | None, Any]],
    names: Sequence[str],
    axes: dict[str, dict[int, str]],
) -> list[dict[str, Any]]:
    """Name the dynamic dimensions of the traced graph ``proto`` (``batch``, ``sequence``)
    and return the ``qat_lightning.inputs`` entries: each ``forward`` parameter in order,
    ``{"name", "position", "dtype", "shape"}`` for a graph input, ``{"name", "position",
    "constant"}`` for a value baked in (``"default": true`` when the call left it at its
    default).

    Raises:
        RuntimeError: the graph's inputs are not one per tensor argument.
    """
    from qat_lightning.export.example_input import Default

    tensors = [name for name, _, value in arguments if torch.is_tensor(value)]
    graph_inputs = list(proto.graph.input)
    if [v.name for v in graph_inputs] != list(names):
        raise RuntimeError(
            f"the graph's inputs {[v.name for v in graph_inputs]} are not the tensor "
            f"arguments {list(names)}"
        )
    mapping: dict[str, str] = {}
    for value, leaf in zip(graph_inputs, tensors, strict=True):
        dims = value.type.tensor_type.shape.dim
        for axis, label in axes.get(leaf, {}).items():
            if dims[axis].HasField("dim_param"):
                mapping.setdefault(dims[axis].dim_param, label)
    _rename_dims([*proto.graph.input, *proto.graph.output], mapping)
    by_leaf = dict(zip(tensors, proto.graph.input, strict=True))
    entries: list[dict[str, Any]] = []
    for name, position, value in arguments:
        entry: dict[str, Any] = {"name": name, "position": position}
        if torch.is_tensor(value):
            graph_input = by_leaf[name]
            entry["name"] = graph_input.name
            entry["dtype"] = str(value.dtype).removeprefix("torch.")
            entry["shape"] = _dims(graph_input)
        elif isinstance(value, Default):
            entry["default"] = True
            if _plain(value.value):
                entry["constant"] = value.value
        else:
            entry["constant"] = value
        entries.append(entry)
    return entries
