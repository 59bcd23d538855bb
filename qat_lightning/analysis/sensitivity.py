"""`sensitivity`: quantize one layer at a time (everything else float) and measure what it costs.

Per bit width the model is copied, quantized with the config at that width and calibrated once
on the float activations (calibration observes with fake quantization off everywhere, so every
quantizer sees what it would see with only its own layer quantized). Then every quantizer is
switched off, and for each layer and side (its weights, or its activation quantizers) only
those are switched on: the model's output SQNR against the float model over the batches, and
the user's metric, are recorded. The arithmetic is fake quantization (`fake_quant_eval`), the
simulation QAT trains with. The user's model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qat_lightning.analysis.result import SIDES, LayerSensitivity, SensitivityResult
from qat_lightning.nn import QuantModule, fake_quant_eval
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import QuantConfig, compute_encodings, quantize_model
from qat_lightning.surgery.calibrate import run_batch, to_device

log = logging.getLogger(__name__)

Metric = Callable[[nn.Module], float]


def _side_quantizers(module: QuantModule, side: str) -> list[Quantizer]:
    if side == "params":
        return [q for q in module.param_quantizers.values() if q is not None]
    return [q for c in (module.input_quantizers, module.output_quantizers) for q in c if q]


def _weight_numel(module: QuantModule) -> int:
    return sum(
        getattr(module, name).numel()
        for name, q in module.param_quantizers.items()
        if q is not None and getattr(module, name, None) is not None
    )


def _activation_numel(model: nn.Module, layers: list[str], batch: Any) -> dict[str, int]:
    """Per layer, the elements per sample (the first dimension is the batch) its activation
    quantizers see in one forward of ``batch``."""
    counts: dict[str, int] = {}
    handles, switched = [], []

    def counter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0] if args else None
            if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] > 0:
                counts[name] = counts.get(name, 0) + x.numel() // x.shape[0]

        return hook

    for name in layers:
        for q in _side_quantizers(model.get_submodule(name), "inputs"):
            handles.append(q.register_forward_hook(counter(name)))
            switched.append(q)
            q.enable_fake_quant(True)  # a quantizer that is off may not be called at all
    try:
        _outputs(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
        for q in switched:
            q.enable_fake_quant(False)
    return counts


def _flat_output(output: Any) -> torch.Tensor:
    """Every floating tensor in a model output, flattened into one float64 vector."""
    if torch.is_tensor(output):
        return output.detach().double().flatten()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        parts = [_flat_output(o) for o in output]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.zeros(0, dtype=torch.float64)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """``10 log10(sum(reference^2) / sum((reference - output)^2))``; ``inf`` if they are equal."""
    noise = float((reference - output).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _check(bits: Sequence[int], which: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    bits = (bits,) if isinstance(bits, int) else tuple(bits)
    which = (which,) if isinstance(which, str) else tuple(which)
    if not bits or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
        raise ValueError(f"sensitivity(bits={bits!r}) is invalid: allowed a list of ints 2..16")
    bad = [b for b in bits if not 2 <= b <= 16]
    if bad:
        raise ValueError(f"sensitivity(bits={bits!r}) is invalid: {bad[0]} is not in 2..16")
    bad_sides = [s for s in which if s not in SIDES]
    if not which or bad_sides:
        raise ValueError(
            f"sensitivity(which={which!r}) is invalid: allowed a non-empty subset of {SIDES}"
        )
    return tuple(sorted(set(bits))), tuple(s for s in SIDES if s in which)


def _at_bits(config: QuantConfig, bits: int) -> QuantConfig:
    return QuantConfig.from_any(
        config,
        inputs=None if config.inputs is None else config.inputs.replace(bits=bits),
        params=None if config.params is None else config.params.replace(bits=bits),
    )


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[Any]) -> torch.Tensor:
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    with fake_quant_eval():
        return torch.cat([_flat_output(run_batch(model, to_device(b, device))) for b in batches])


def sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    metric: Metric | None = None,
    bits: Sequence[int] = (2, 4, 8),
    which: Sequence[str] = ("params", "inputs"),
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = 8,
) -> SensitivityResult:
    """Per-layer sensitivity of a float model: each layer quantized alone at each bit width.

    Args:
        model: the float model; it is deep-copied, never modified.
        batches: calibration batches (model inputs, as `qat_lightning.calibrate` takes them);
            the output SQNR is measured on the same batches.
        metric: ``metric(model) -> float``, higher is better (e.g. accuracy on held-out
            data), called with the model in eval mode under ``torch.no_grad``; None to
            measure the output SQNR only.
        bits: the bit widths to try (2..16).
        which: ``"params"`` (each layer's weights), ``"inputs"`` (each layer's activation
            quantizers), or both.
        config: the `QuantConfig` the search starts from (schemes, skips, overrides); each
            side's bit width is set per trial.
        input_fn: maps each item of ``batches`` to the model's input.
        num_batches: use at most this many batches (None: all of them).

    Returns:
        a `SensitivityResult` (``print`` it, ``to_dict()``, ``plot(path)``).

    Example:
        >>> result = sensitivity(model, [x for x, _ in calib], lambda m: top1(m, val_loader))
        >>> print(result)
        >>> choice = mixed_precision(result, budget=0.15)
    """
    bits, which = _check(bits, which)
    config = QuantConfig.from_any(config)
    reference = copy.deepcopy(model).eval()
    data: list[Any] = []
    for batch in batches:
        if num_batches is not None and len(data) >= num_batches:
            break
        data.append(input_fn(batch) if input_fn is not None else batch)
    if not data:
        raise ValueError("sensitivity(batches=...) is invalid: it yielded no batch")
    expected = _outputs(reference, data)
    baseline = None if metric is None else _measure(metric, reference)

    copies: dict[int, nn.Module] = {}
    for b in bits:
        quantized = copy.deepcopy(model).eval()
        quantize_model(quantized, _at_bits(config, b))
        compute_encodings(quantized, data)
        for q in quantized.modules():
            if isinstance(q, Quantizer):
                q.enable_fake_quant(False)
        copies[b] = quantized
    layers = [
        name
        for name, m in copies[bits[0]].named_modules()
        if isinstance(m, QuantModule) and any(_side_quantizers(m, side) for side in which)
    ]
    entries: list[LayerSensitivity] = []
    weight_numel: dict[str, int] = {}
    activation_numel = (
        _activation_numel(copies[bits[0]], layers, data[0]) if "inputs" in which else {}
    )
    for index, name in enumerate(layers):
        line = []
        for side in which:
            for b in bits:
                module = copies[b].get_submodule(name)
                quantizers = _side_quantizers(module, side)
                if not quantizers:
                    continue
                if side == "params":
                    weight_numel[name] = _weight_numel(module)
                for q in quantizers:
                    q.enable_fake_quant(True)
                try:
                    sqnr = sqnr_db(expected, _outputs(copies[b], data))
                    value = None if metric is None else _measure(metric, copies[b])
                finally:
                    for q in quantizers:
                        q.enable_fake_quant(False)
                delta = None if value is None else value - baseline
                entries.append(LayerSensitivity(name, side, b, sqnr, value, delta))
                line.append(
                    f"{side[0].upper()}{b} {sqnr:.1f} dB"
                    + ("" if delta is None else f" ({delta:+.4f})")
                )
        log.info("sensitivity %d/%d %s: %s", index + 1, len(layers), name, ", ".join(line))
    return SensitivityResult(entries, baseline, weight_numel, bits, which, activation_numel)


def _measure(metric: Metric, model: nn.Module) -> float:
    with torch.no_grad(), fake_quant_eval():
        value = metric(model.eval())
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"sensitivity(metric=...) returned {value!r}: allowed a number (higher is better)"
        ) from err
