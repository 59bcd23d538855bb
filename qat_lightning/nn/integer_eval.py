"""When a quantized module's ``forward`` runs its integer simulation instead of fake quant.

`integer_in_eval` decorates each family's ``forward``: in eval mode without autograd, once the
module's encodings are set, it runs ``dequantize(quantized_forward(quantize(inputs)))``.
`integer_eval_allowed` is the one context check (eval, no grad, not `fake_quant_eval`, not
compiling, tracing or exporting); `exact_arithmetic` keeps autocast out of integer sums.
"""

from __future__ import annotations

import contextvars
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from qat_lightning.nn.base import QuantModule

_FAKE_QUANT_EVAL = contextvars.ContextVar("fake_quant_eval", default=False)


@contextmanager
def fake_quant_eval() -> Iterator[None]:
    """Inside, eval-mode ``forward`` runs float32 fake quantization, the arithmetic training
    uses, instead of the integer simulation.

    Example:
        >>> with torch.no_grad(), fake_quant_eval():
        ...     simulated = model(x)     # what the training graph computes
    """
    token = _FAKE_QUANT_EVAL.set(True)
    try:
        yield
    finally:
        _FAKE_QUANT_EVAL.reset(token)


def integer_eval_allowed(module: nn.Module) -> bool:
    """Whether the context lets ``module`` run its integer simulation: eval mode, no
    autograd, not inside `fake_quant_eval`, not compiling, tracing or exporting to ONNX."""
    return not (
        module.training
        or torch.is_grad_enabled()
        or _FAKE_QUANT_EVAL.get()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def integer_in_eval(forward: Callable) -> Callable:
    """Decorate a quantized module's ``forward``: in eval mode without autograd, and once the
    module's encodings are set, run ``dequantize(quantized_forward(quantize(inputs)))`` instead.

    Training, anything that needs gradients, calibration (`compute_encodings`), a quantizer
    switched off, tracing or compiling, and `fake_quant_eval` keep the fake-quant ``forward``.
    """

    @functools.wraps(forward)
    def wrapper(self: QuantModule, *inputs: Any, **kwargs: Any) -> Any:
        if self.runs_integer(inputs) and not self.__dict__.get("_no_integer_form"):
            try:
                with exact_arithmetic(tensor_inputs(inputs)[0].device):
                    return self.integer_forward(*inputs, **kwargs)
            except ValueError as error:  # a configuration integer mode does not cover
                self.__dict__["_no_integer_form"] = True
                warnings.warn(
                    f"{type(self).__name__} evaluates in fake quant, not as the integer "
                    f"model: {error}",
                    stacklevel=2,
                )
        return forward(self, *inputs, **kwargs)

    return wrapper


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def exact_arithmetic(device: torch.device | str) -> Iterator[None]:
    """Autocast off inside: the integer simulation chooses its own dtypes (float32 over exact
    ranges, float64), and under ``bf16-mixed`` autocast would run its convolutions and matmuls
    in bfloat16, which does not hold the integer sums exactly.

    Every integer entry point (eval-mode ``forward``, `convert`'s modules) runs inside it.
    """
    device_type = torch.device(device).type
    if device_type not in _AUTOCAST_DEVICES:
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


# Float inputs the integer simulation takes: half types (under autocast) are upcast exactly.
INTEGER_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor_inputs(inputs: Sequence[Any]) -> list[Any]:
    """The tensor inputs of a forward call: ``(x,)``, ``(a, b)`` or ``([t0, t1, ...],)``."""
    if len(inputs) == 1 and isinstance(inputs[0], list | tuple):
        return list(inputs[0])
    return list(inputs)
