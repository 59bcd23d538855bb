"""`OnnxModel`: run an exported ONNX file from Python, tensors in and tensors out.

    >>> from qat_lightning.export import OnnxModel
    >>> model = OnnxModel("qat_export/model_int.onnx")
    >>> logits = model(torch.rand(4, 64))
    >>> bert = OnnxModel("bert_int.onnx")
    >>> logits = bert(input_ids, attention_mask=mask)  # as the model's forward is called

A thin wrapper over an onnxruntime CPU session that checks each input (name, rank, fixed
dimensions, dtype) before running, so a mistake names the input instead of surfacing as
onnxruntime's own message. Inputs go by position, as the exported ``forward`` numbered its
parameters (the file's ``qat_lightning.inputs``), or by name; an argument the export baked in
as a constant (``attention_mask=None``) may be given only with that same value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qat_lightning.export._files import ExportError
from qat_lightning.export.onnx_io import INPUTS_KEY, read_metadata

# onnxruntime's type strings of the tensor types an export can have as inputs.
_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _arguments(entries: Any, input_names: list[str]) -> list[dict[str, Any]]:
    """The file's ``qat_lightning.inputs`` entries, or (a file without them, or whose entries
    do not name its inputs) one positional entry per graph input."""
    readable = isinstance(entries, list) and all(
        isinstance(e, dict) and "name" in e for e in entries
    )
    if readable and {e["name"] for e in entries if "dtype" in e} == set(input_names):
        return entries
    return [{"name": n, "position": i} for i, n in enumerate(input_names)]


def _same(value: Any, constant: Any) -> bool:
    if constant is None or isinstance(constant, bool):
        return value is constant
    return not isinstance(value, (bool, torch.Tensor)) and value == constant


def _value_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {_shape_text(list(value.shape))}"
    return repr(value)


def _shape_text(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class OnnxModel:
    """An exported ONNX model as a callable: ``OnnxModel(path)(x) -> torch.Tensor``.

    Args:
        path: the ``.onnx`` file (e.g. ``model_int.onnx`` of the QATCallback's export).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).

    Attributes:
        input_names / output_names: the graph's inputs and outputs, in order.
        arguments: each ``forward`` parameter of the export in order (``qat_lightning.inputs``:
            name, position, and dtype and shape, or the constant baked in); for a file without
            that entry, the graph inputs by position.
        constants: ``{name: value}`` of the arguments baked in as constants (no graph input).
        metadata: the file's ``metadata_props``, JSON values decoded (``qat_lightning.version``,
            ``qat_lightning.schemes``, ``qat_lightning.inputs``, ``metrics`` when the export
            was given them).

    Raises:
        ExportError: the file is missing or onnxruntime cannot load it.

    Example:
        >>> model = OnnxModel("model_int.onnx")
        >>> model(torch.rand(8, 64)).argmax(-1)
        >>> OnnxModel("bert_int.onnx")(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"OnnxModel({str(path)!r}): no such file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise ExportError(
                f"OnnxModel({str(path)!r}): onnxruntime cannot load it: {error}"
            ) from error
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = read_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        self.arguments = _arguments(self.metadata.get(INPUTS_KEY), self.input_names)
        self.constants = {
            e["name"]: e["constant"]
            for e in self.arguments
            if "constant" in e and e["name"] not in self.input_names
        }

    def __repr__(self) -> str:
        inputs = ", ".join(f"{i.name}: {_shape_text(i.shape)}" for i in self._inputs)
        return f"OnnxModel({str(self.path)!r}, inputs=[{inputs}], outputs={self.output_names})"

    def _given(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's values by input name: positions as the model's ``forward`` had them
        (from the file's ``qat_lightning.inputs``; graph order for files without it), and
        constants the export baked in checked and dropped."""
        where = f"OnnxModel({self.path.name})"
        entries = {e["name"]: e for e in self.arguments}
        positional = [e["name"] for e in self.arguments if e.get("position") is not None]
        positional.sort(key=lambda n: entries[n]["position"])
        if len(args) > len(positional):
            raise TypeError(
                f"{where}: {len(args)} positional inputs given: allowed at most "
                f"{len(positional)} ({', '.join(positional)})"
            )
        given = dict(zip(positional, args, strict=False))
        for name, value in kwargs.items():
            if name not in entries:
                raise TypeError(f"{where}: unknown input {name!r}: allowed {', '.join(entries)}")
            if name in given:
                raise TypeError(f"{where}: input {name!r} given twice (positional and keyword)")
            given[name] = value
        for name in list(given):
            entry = entries[name]
            if name in self.input_names:
                continue
            value = given.pop(name)
            if "constant" in entry and _same(value, entry["constant"]):
                continue
            baked = f"{name}={entry['constant']!r}" if "constant" in entry else "its default"
            allowed = repr(entry["constant"]) if "constant" in entry else "leaving it out"
            raise TypeError(
                f"{where}: {name!r} is {_value_text(value)}, but this file has no input for "
                f"it (the export baked in {baked}): allowed {allowed}; export with a tensor "
                f"{name} to make it an input"
            )
        return given

    def _feed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        where = f"OnnxModel({self.path.name})"
        given = self._given(args, kwargs)
        feed = {}
        for spec in self._inputs:
            if spec.name not in given:
                raise TypeError(f"{where}: missing input {spec.name!r} {_shape_text(spec.shape)}")
            value = given[spec.name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{where}: input {spec.name!r} is a {type(value).__name__}: allowed a "
                    "torch.Tensor"
                )
            shape = list(value.shape)
            fixed_mismatch = any(
                isinstance(want, int) and want != got
                for want, got in zip(spec.shape, shape, strict=False)
            )
            if len(shape) != len(spec.shape) or fixed_mismatch:
                raise ValueError(
                    f"{where}: input {spec.name!r} has shape {_shape_text(shape)}: allowed "
                    f"{_shape_text(spec.shape)} (names are free dimensions)"
                )
            dtype = _DTYPES.get(spec.type)
            if dtype is not None and value.dtype != dtype:
                raise TypeError(
                    f"{where}: input {spec.name!r} has dtype {value.dtype}: allowed {dtype}"
                )
            feed[spec.name] = value.detach().cpu().numpy()
        return feed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on CPU.

        Inputs go by position (as the exported ``forward`` numbered its parameters; in
        `input_names` order for a file without ``qat_lightning.inputs``) or by name, as the
        torch model is called; ``**example_input`` of a dict export works as it is.

        Returns:
            The output tensor, or ``{name: tensor}`` when the graph has several outputs.

        Raises:
            TypeError: an input is missing, unknown, given twice, not a tensor or of the
                wrong dtype, or a baked-in argument is given another value (the message
                names it and what is allowed).
            ValueError: an input's rank or a fixed dimension differs from the graph's.
        """
        outputs = self.session.run(None, self._feed(args, kwargs))
        tensors = [torch.from_numpy(np.asarray(o)) for o in outputs]
        if len(tensors) == 1:
            return tensors[0]
        return dict(zip(self.output_names, tensors, strict=True))
