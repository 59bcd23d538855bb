"""`calibrate`: post-training quantization (PTQ) in one call: quantize, observe, fix encodings.

The result is the same kind of model QAT leaves: every quantizer has an encoding and fake
quantization on, so `qat_lightning.export.convert`, `export_onnx` and `save_quantized` take it
as they take a QAT model, and its eval mode runs the integer simulation (bit for bit `convert`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from qat_lightning.quant import Quantizer
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.modes import kept_modes
from qat_lightning.surgery.outside_reads import revert_unobserved
from qat_lightning.surgery.quantize import quantize_model
from qat_lightning.surgery.report import QuantizationReport

InputFn = Callable[[Any], Any]


def _quantizer_owned(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("input_quantizers", "output_quantizers", "param_quantizers") for p in parts)


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or list, ``model(**batch)``
    for a dict."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def compute_encodings(
    model: nn.Module,
    batches: Iterable[Any],
    input_fn: InputFn | None = None,
    num_batches: int | None = None,
    *,
    report: QuantizationReport | None = None,
) -> int:
    """Calibrate a quantized ``model`` in place on ``batches``; return how many were used.

    Every quantizer's observer is reset and observes (fake quantization off) while the model
    runs in eval mode without gradients; then each encoding is fixed and fake quantization is
    switched on, observers off. Non-quantizer buffers (BatchNorm statistics) are restored, so
    only the encodings change. The model's train/eval mode is restored. A quantized layer
    that observed nothing (its weight is read outside its forward, or it never runs) is
    swapped back to float, with a warning and, in ``report``, a float row saying why
    (`revert_unobserved`).

    Args:
        model: a model `quantize_model` has quantized.
        batches: an iterable of model inputs (see `calibrate`).
        input_fn: maps one item of ``batches`` to the model's input.
        num_batches: use at most this many batches (None: all of them).

    Raises:
        ValueError: if the model has no quantizer, ``num_batches`` is not a positive int, or
            ``batches`` yields nothing.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(
            f"calibrate(num_batches={num_batches!r}) is invalid: allowed a positive int or None"
        )
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    if not quantizers:
        raise ValueError("calibrate: the model has no quantizer; quantize it first")
    saved = {n: b.clone() for n, b in model.named_buffers() if not _quantizer_owned(n)}
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    seen = 0
    try:
        # each quantizer: reset, observe; encodings fixed on exit
        with kept_modes(model), ExitStack() as stack:
            for quantizer in quantizers:
                stack.enter_context(quantizer.compute_encodings())
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                item = input_fn(batch) if input_fn is not None else batch
                run_batch(model, to_device(item, device))
                seen += 1
    finally:
        for name, buf in model.named_buffers():
            if name in saved:
                buf.copy_(saved[name])
    if seen == 0:
        raise ValueError("calibrate(batches=...) is invalid: it yielded no batch")
    revert_unobserved(model, report)
    return seen


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    input_fn: InputFn | None = None,
    num_batches: int | None = None,
    **changes: Any,
) -> QuantizationReport:
    """Post-training quantization: `quantize_model` in place, then calibrate on ``batches``.

    No training happens: the parameters and BatchNorm statistics are those of the float model.
    The model afterwards holds fixed encodings with fake quantization on, like a model after
    QAT; `convert`, `export_onnx` and `save_quantized` take it as it is.

    Args:
        model: the float model (its train/eval mode is kept).
        batches: an iterable of model inputs, one per forward call: a tensor is called as
            ``model(x)``, a tuple or list as ``model(*batch)``, a dict as ``model(**batch)``.
            For a DataLoader of ``(x, y)`` pairs pass ``input_fn=lambda batch: batch[0]``.
        config: a `QuantConfig`, a dict of its fields, or None for the defaults.
        input_fn: maps each item of ``batches`` to the model's input.
        num_batches: use at most this many batches (None: all).
        **changes: config fields on top of ``config``, e.g. ``params={"bits": 4}``.

    Returns:
        the `QuantizationReport` of the surgery.

    Raises:
        ValueError: as `quantize_model` does, or if ``batches`` yields nothing.

    Example:
        >>> report = calibrate(model, loader, params={"bits": 4}, input_fn=lambda b: b[0],
        ...                    num_batches=8)
        >>> integer_model = convert(model)
    """
    report = quantize_model(model, config, **changes)
    compute_encodings(model, batches, input_fn=input_fn, num_batches=num_batches, report=report)
    return report
