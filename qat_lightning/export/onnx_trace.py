"""How `export_onnx` traces when torch.export cannot trace a model as asked, and says so.

- A non-tensor argument (``attention_mask=None``, ``return_dict=False``) is baked in: one
  warning names them all.
- A sequence axis the model fixes (a float mask of fixed length beside the token ids): traced
  again with the sequence fixed, and a warning.
- A branch on tensor values (``nn.Transformer``'s ``if (mask == causal).all()``): traced on the
  example's real values, keeping the branch the example takes, and a warning naming it.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from qat_lightning.export.example_input import Default, dynamic_shapes


def note_constants(arguments: list[tuple[str, int | None, Any]]) -> None:
    given = [(n, v) for n, _, v in arguments if not isinstance(v, (torch.Tensor, Default))]
    if given:
        shown = ", ".join(f"{n}={v!r}" for n, v in given)
        warnings.warn(
            f"export_onnx: {shown} {'is' if len(given) == 1 else 'are'} baked into the graph "
            "(the ONNX has no input for non-tensor arguments; its metadata records them)",
            stacklevel=3,
        )


def trace_dynamic(
    tensors: dict[str, torch.Tensor],
    bound: inspect.BoundArguments,
    axes: dict[str, dict[int, str]],
    trace: Any,
) -> tuple[onnx.ModelProto, dict[str, dict[int, str]], bool]:
    """Trace with ``axes`` dynamic. If the model branches on tensor values, trace again on
    the example's real values; if only the sequence axes fail, again with them fixed; say
    so either way. Returns the graph, the axes asked dynamic, and whether it took the
    real-value trace."""
    try:
        return trace(dynamic_shapes(bound, axes), False), axes, False
    except Exception as error:
        if _data_dependent(error):
            return _trace_real_values(tensors, trace, error), axes, True
        sequence = [n for n, a in axes.items() if 1 in a]
        if not sequence:
            raise
        fixed = {n: {k: v for k, v in a.items() if k != 1} for n, a in axes.items()}
        try:
            proto = trace(dynamic_shapes(bound, fixed), False)
        except Exception:
            raise error from None
        warnings.warn(
            f"export_onnx: the sequence length (dimension 1 of {', '.join(sequence)}) is fixed "
            f"at {tensors[sequence[0]].shape[1]} in the ONNX: the model does not trace with "
            f"it dynamic ({root_cause(error).splitlines()[0]})",
            stacklevel=3,
        )
        return proto, fixed, False


def _data_dependent(error: BaseException) -> bool:
    chain: BaseException | None = error
    while chain is not None:
        if "DataDependent" in type(chain).__name__:
            return True
        chain = chain.__cause__
    return False


def _trace_real_values(
    tensors: dict[str, torch.Tensor], trace: Any, error: BaseException
) -> onnx.ModelProto:
    """torch.export cannot trace a branch on tensor values (``if (mask == causal).all()``,
    as ``nn.Transformer`` does); tracing on the example's real values keeps the branch the
    example takes. Used only when that is the alternative to failing, with a warning naming
    the branch."""
    try:
        proto = trace(None, True)
    except Exception:
        raise error from None
    text = root_cause(error)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', str(text))
    where = (
        f" at {Path(frames[-1][0]).name}:{frames[-1][1]} `{frames[-1][3].strip()}`"
        if frames
        else ""
    )
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
    warnings.warn(
        f"export_onnx: the model branches on tensor values{where} "
        f"({text.splitlines()[0].split(' (unhinted')[0]}), which torch.export cannot trace: "
        f"traced on this example's values ({shapes}), the ONNX keeps the branch it takes; "
        "check the ONNX on inputs like those you serve",
        stacklevel=4,
    )
    return proto


def root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:  # the exporter wraps the error that stopped it
        error = error.__cause__
    return f"{type(error).__name__}: {error}"
