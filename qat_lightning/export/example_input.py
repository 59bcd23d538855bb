"""The example input of an export: the arguments a model's ``forward`` is called with.

`export_onnx` and ``QATCallback(example_input=...)`` take one tensor (the only argument), a
tuple or list (positional arguments), a dict with string keys (keyword arguments), or an
`ExampleInput` (both). Each argument is a tensor, which becomes a graph input, or ``None``, a
bool, an int or a float, which the traced graph bakes in as a constant (the ONNX has no input
for it, `export_onnx` says so in one line and records it in the file's metadata). Anything else
(strings, nested lists, dicts of tensors as one argument) is refused with a ``ValueError``.

Dynamic axes (see `dynamic_axes`): dimension 0 of every tensor whose first dimension is the
batch of the first tensor is ``batch``; dimension 1 of every integer or bool tensor of rank >= 2
(token ids, attention masks) whose second dimension is that of the first such tensor is
``sequence``. Integer tensors keep their dtype: token ids go in as int64, never quantized.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

CONSTANT_TYPES = (type(None), bool, int, float)
ALLOWED = (
    "allowed a torch.Tensor, a tuple/list of positional arguments or a dict with str keys of "
    "keyword arguments, each a tensor, None, bool, int or float"
)


def _type_name(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {'/'.join(inner)}" if inner else type(value).__name__
    if isinstance(value, dict):
        keys = "/".join(sorted({type(k).__name__ for k in value})) or "?"
        values = "/".join(sorted({type(v).__name__ for v in value.values()})) or "?"
        return f"dict[{keys}, {values}]"
    return type(value).__name__


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex())


@dataclass(frozen=True, eq=False)
class ExampleInput:
    """The positional and keyword arguments of one ``forward`` call.

    Attributes:
        args: positional arguments.
        kwargs: keyword arguments (string keys).
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str) -> ExampleInput:
        """``value`` (a tensor, tuple, list, dict or `ExampleInput`) as an `ExampleInput`.

        Raises:
            ValueError: ``value`` is none of those, a dict key is not a string, or an
                argument is not a tensor, None, bool, int or float (the message names
                ``example_input``, the value's type and what is allowed).
        """
        shown = f"{where}(example_input=<{_type_name(value)}>) is invalid"
        if isinstance(value, ExampleInput):
            example = value
        elif torch.is_tensor(value):
            example = cls((value,), {})
        elif isinstance(value, (tuple, list)):
            example = cls(tuple(value), {})
        elif isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise ValueError(f"{shown}: key {bad[0]!r} is a {type(bad[0]).__name__}; {ALLOWED}")
            example = cls((), dict(value))
        else:
            raise ValueError(f"{shown}: {ALLOWED}")
        example.check(shown)
        return example

    def check(self, shown: str) -> None:
        """Raise ``ValueError(f"{shown}: ...")`` unless every argument is a tensor, None,
        bool, int or float, and one at least is a tensor."""
        for name, argument in self.named_arguments():
            if not (torch.is_tensor(argument) or isinstance(argument, CONSTANT_TYPES)):
                raise ValueError(f"{shown}: argument {name} is a {_type_name(argument)}; {ALLOWED}")
        if not self.tensors():
            raise ValueError(f"{shown}: it holds no tensor; {ALLOWED}")

    def named_arguments(self) -> Iterator[tuple[str, Any]]:
        """``(position or name, value)`` of each argument, positional first."""
        yield from ((str(i), a) for i, a in enumerate(self.args))
        yield from ((repr(k), a) for k, a in self.kwargs.items())

    def tensors(self) -> list[torch.Tensor]:
        return [a for _, a in self.named_arguments() if torch.is_tensor(a)]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleInput:
        def apply(value: Any) -> Any:
            return fn(value) if torch.is_tensor(value) else value

        return ExampleInput(
            tuple(apply(a) for a in self.args), {k: apply(v) for k, v in self.kwargs.items()}
        )

    def batch_size(self) -> int | None:
        """Dimension 0 of the first tensor (None for a scalar)."""
        first = self.tensors()[0]
        return first.shape[0] if first.dim() > 0 else None

    def snapshot(self, rows: int = 2) -> ExampleInput:
        """Detached CPU copies, each batched tensor cut to its first ``rows`` rows."""
        batch = self.batch_size()

        def cut(t: torch.Tensor) -> torch.Tensor:
            if batch is not None and t.dim() > 0 and t.shape[0] == batch:
                t = t[:rows]
            return t.detach().clone().cpu()

        return self.map_tensors(cut)

    def to_state(self) -> dict[str, Any]:
        """Plain containers of CPU tensors (a checkpoint loads them with weights_only)."""
        cpu = self.map_tensors(lambda t: t.detach().cpu())
        return {"args": list(cpu.args), "kwargs": dict(cpu.kwargs)}

    @classmethod
    def from_state(cls, state: dict[str, Any] | torch.Tensor | None) -> ExampleInput | None:
        """The inverse of `to_state` (a bare tensor, as older states hold, is one argument)."""
        if state is None:
            return None
        if torch.is_tensor(state):
            return cls((state,), {})
        return cls(tuple(state.get("args", ())), dict(state.get("kwargs", {})))

    def single_tensor(self) -> torch.Tensor | None:
        """The CPU tensor when the call is one positional tensor, else None."""
        if len(self.args) == 1 and not self.kwargs and torch.is_tensor(self.args[0]):
            return self.args[0].detach().cpu()
        return None


def bind(model: Any, example: ExampleInput, where: str) -> inspect.BoundArguments:
    """``example`` bound to ``model.forward``'s parameters (kwargs reordered to match).

    Raises:
        ValueError: the arguments do not fit the signature (names the error).
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature
        signature = inspect.Signature(
            [
                inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
            ]
        )
    try:
        return signature.bind(*example.args, **example.kwargs)
    except TypeError as error:
        raise ValueError(
            f"{where}(example_input=<{_type_name(example.args or example.kwargs)}>) does not fit "
            f"{type(model).__name__}.forward{signature}: {error}"
        ) from error


def ordered(bound: inspect.BoundArguments, example: ExampleInput) -> ExampleInput:
    """``example`` with its keyword arguments in signature order (the graph's input order)."""
    rank = {name: i for i, name in enumerate(bound.signature.parameters)}
    kwargs = sorted(example.kwargs.items(), key=lambda item: rank.get(item[0], len(rank)))
    return ExampleInput(example.args, dict(kwargs))


def leaves(bound: inspect.BoundArguments) -> list[tuple[str, int | None, Any]]:
    """``(name, position, value)`` of each parameter of ``forward``, in signature order.

    ``position`` is the index a positional call would use (None for keyword-only parameters
    and ``**kwargs`` entries); ``*args`` entries are named ``args_0``, ``args_1``, ...; a
    parameter the call did not give has its default wrapped in `Default`.
    """
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    out: list[tuple[str, int | None, Any]] = []
    position: int | None = 0
    for name, parameter in bound.signature.parameters.items():
        kind = parameter.kind
        at = position if kind in positional else None
        if kind == inspect.Parameter.VAR_POSITIONAL:
            values = bound.arguments.get(name, ())
            out += [(f"{name}_{i}", position + i, v) for i, v in enumerate(values)]
            position = None  # what follows *args is keyword-only
        elif kind == inspect.Parameter.VAR_KEYWORD:
            out += [(k, None, v) for k, v in bound.arguments.get(name, {}).items()]
        elif name in bound.arguments:
            out.append((name, at, bound.arguments[name]))
        elif parameter.default is not inspect.Parameter.empty:
            out.append((name, at, Default(parameter.default)))
        if at is not None:
            position = at + 1
    return out


@dataclass(frozen=True)
class Default:
    """The default value of a parameter the call did not give."""

    value: Any


def dynamic_axes(
    tensors: list[tuple[str, torch.Tensor]], batch: bool, sequence: bool
) -> dict[str, dict[int, str]]:
    """``{input name: {axis: "batch" | "sequence"}}`` by the rules of the module doc."""
    axes: dict[str, dict[int, str]] = {name: {} for name, _ in tensors}
    if not tensors or not batch:
        return axes
    first = tensors[0][1]
    if first.dim() == 0:
        return axes
    rows = first.shape[0]
    batched = [(n, t) for n, t in tensors if t.dim() > 0 and t.shape[0] == rows]
    for name, _ in batched:
        axes[name][0] = "batch"
    tokens = [(n, t) for n, t in batched if t.dim() >= 2 and _is_integer(t)]
    if sequence and tokens:
        length = tokens[0][1].shape[1]
        for name, tensor in tokens:
            if tensor.shape[1] == length:
                axes[name][1] = "sequence"
    return axes


def dynamic_shapes(
    bound: inspect.BoundArguments, axes: dict[str, dict[int, str]]
) -> dict[str, Any] | None:
    """torch.export's ``dynamic_shapes`` for ``bound`` (by parameter name, ``*args`` as a
    tuple, ``**kwargs`` as a dict): `Dim.DYNAMIC` on each axis of ``axes`` (keyed by the
    names of `leaves`), so that an axis the model fixes is an error, not a silent constant."""
    if not any(axes.values()):
        return None

    def spec(name: str, value: Any) -> dict[int, Any] | None:
        if not torch.is_tensor(value) or not axes.get(name):
            return None
        return dict.fromkeys(axes[name], torch.export.Dim.DYNAMIC)

    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(f"{name}_{i}", v) for i, v in enumerate(value))
        elif kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(k, v) for k, v in value.items()}
        else:
            shapes[name] = spec(name, value)
    return shapes
