"""The native artifact: ``model.safetensors`` + ``encodings.json`` + ``report.json``.

- ``model.safetensors``: the converted model's state: integer weight codes (int8; 4-bit packed
  two per byte), int32 biases, scales and zero points, and the float parameters of layers left
  float. Loading it never unpickles anything.
- ``encodings.json``: every quantized tensor's encoding, readable by other tools (in the spirit
  of AIMET's encodings file): ``{"activation_encodings": {...}, "param_encodings": {...}}``
  keyed by ``<module>.input.<i>`` / ``<module>.output`` / ``<module>.<param>``.
- ``report.json``: the layer table (`layer_report`) and the `QuantConfig` used, if known.

How `load_quantized` rebuilds the architecture: the artifact holds tensors, not code, so the
caller supplies the model's architecture: a fresh float model of the same class (surgery is
re-run with the saved config) or a QAT model of the same architecture. Its quantizers take
the saved encodings, `convert` builds the integer modules, and the saved state replaces every
tensor, so the outputs are bit-identical to the saved converted model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qat_lightning.export._files import ExportError, atomic_paths
from qat_lightning.export.convert import convert, is_converted
from qat_lightning.export.modules import IntegerEmbedding, IntegerLayer
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.qdq import onnx_container
from qat_lightning.export.report import layer_report
from qat_lightning.nn.base import QuantModule
from qat_lightning.quant import Quantizer, QuantScheme

FORMAT = "qat_lightning.native/1"
FILES = ("model.safetensors", "encodings.json", "report.json")


# -- encodings ---------------------------------------------------------------------------------
def _entry(
    name: str, scheme: QuantScheme | None, scale: torch.Tensor, zero_point: torch.Tensor
) -> dict[str, Any]:
    scale = scale.detach().float().cpu().reshape(-1)
    zero_point = zero_point.detach().round().to(torch.int64).cpu().reshape(-1)
    per_channel = scheme is None or (scheme.per_channel and scale.numel() > 0)
    if scheme is None:  # an int32 bias at the accumulator scale
        fields = {"bits": 32, "symmetric": True, "signed": True, "narrow_range": False}
        fields |= {"representation": "int", "frac_bits": None, "dtype": "int32"}
        fields |= {"qmin": -(2**31), "qmax": 2**31 - 1}
    else:
        fields = {k: getattr(scheme, k) for k in ("bits", "symmetric", "signed", "narrow_range")}
        fields |= {"representation": scheme.representation, "frac_bits": scheme.frac_bits}
        fields |= {"dtype": str(onnx_container(scheme)).removeprefix("torch.")}
        fields |= {"qmin": scheme.qmin, "qmax": scheme.qmax}
    return {
        "name": name,
        **fields,
        "granularity": "per_channel" if per_channel and scale.dim() else "per_tensor",
        "axis": (0 if scheme is None else scheme.axis) if per_channel else None,
        "scale": scale.tolist(),
        "zero_point": zero_point.tolist(),
    }


def _quantizer_entry(name: str, quantizer: Quantizer) -> dict[str, Any]:
    scale, zero_point = quantizer.encoding()
    return _entry(name, quantizer.scheme, scale, zero_point)


def encodings(model: nn.Module) -> dict[str, Any]:
    """Every encoding of a converted model, as the JSON-ready dict of ``encodings.json``."""
    activations: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedOp):
            inner = module.module
            for i, q in enumerate(inner.input_quantizers):
                if q is not None:
                    activations[f"{name}.input.{i}"] = _quantizer_entry(f"{name}.input.{i}", q)
            for param, q in inner.param_quantizers.items():
                if q is not None:
                    params[f"{name}.{param}"] = _quantizer_entry(f"{name}.{param}", q)
        elif isinstance(module, (IntegerLayer, IntegerEmbedding)):
            for i, q in enumerate(module.input_quantizers):
                if q is not None:
                    activations[f"{name}.input.{i}"] = _quantizer_entry(f"{name}.input.{i}", q)
            w = f"{name}.weight"
            params[w] = _entry(
                w, module.weight_scheme, module.weight_scale, module.weight_zero_point
            )
            if getattr(module, "bias_codes", None) is not None:
                scale = module.accumulator_scale().float()
                params[f"{name}.bias"] = _entry(
                    f"{name}.bias", None, scale, torch.zeros_like(scale, dtype=torch.int32)
                )
        else:
            continue
        outs = (
            module.module.output_quantizers
            if isinstance(module, QuantizedOp)
            else (module.output_quantizers)
        )
        if len(outs) and outs[0] is not None:
            activations[f"{name}.output"] = _quantizer_entry(f"{name}.output", outs[0])
    return {"format": FORMAT, "activation_encodings": activations, "param_encodings": params}


# -- save ----------------------------------------------------------------------------------------
def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    from qat_lightning.surgery import QuantConfig

    config = QuantConfig.from_any(config)

    def plain(value: Any) -> Any:
        if isinstance(value, QuantScheme):
            return value.to_dict()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_quantized(model: nn.Module, directory: str | Path, *, config: Any = None) -> Path:
    """Write the native artifact of ``model`` to ``directory`` (created if needed).

    Args:
        model: a calibrated QAT model (converted here) or the output of `convert`.
        directory: where ``model.safetensors``, ``encodings.json`` and ``report.json`` go.
        config: the `QuantConfig` (or dict) ``quantize_model`` used; saved so that
            `load_quantized` can rebuild from a fresh float model.

    Returns:
        ``directory`` as a Path. Each file is written to a temp file and moved in place only
        once all three are complete.

    Raises:
        ExportError: the directory is not writable (names it) or writing failed.
    """
    directory = Path(directory)
    converted = model if is_converted(model) else convert(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in converted.state_dict().items()}
    report = {"format": FORMAT, "config": _config_dict(config), **layer_report(converted)}
    texts = [json.dumps(encodings(converted), indent=1), json.dumps(report, indent=1)]
    with atomic_paths([directory / f for f in FILES], "save_quantized") as temps:
        try:
            save_file(state, str(temps[0]), metadata={"format": FORMAT})
            for temp, text in zip(temps[1:], texts, strict=True):
                temp.write_text(text + "\n")
        except OSError as error:
            raise ExportError(
                f"save_quantized: writing {str(directory)!r} failed: {error}"
            ) from error
    return directory


# -- load ----------------------------------------------------------------------------------------
def _apply(quantizer: Quantizer | None, entry: dict[str, Any] | None) -> None:
    """Give a (fresh) QAT quantizer the saved encoding, or switch it off if it had none."""
    if quantizer is None:
        return
    if entry is None:
        quantizer.enable_fake_quant(False).enable_observer(False)
        return
    shape = quantizer.scale.shape if not quantizer.scheme.per_channel else (len(entry["scale"]),)
    scale = torch.tensor(entry["scale"], dtype=torch.float32).reshape(shape)
    zero_point = torch.tensor(entry["zero_point"], dtype=torch.int32).reshape(shape)
    quantizer._set_encoding(scale, zero_point)
    quantizer.initialized.fill_(1)
    quantizer.enable_fake_quant(True).enable_observer(False)


def _load_encodings(model: nn.Module, saved: dict[str, Any]) -> None:
    acts, params = saved["activation_encodings"], saved["param_encodings"]
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        for i, q in enumerate(module.input_quantizers):
            _apply(q, acts.get(f"{name}.input.{i}"))
        if len(module.output_quantizers):
            _apply(module.output_quantizers[0], acts.get(f"{name}.output"))
        for param, q in module.param_quantizers.items():
            _apply(q, params.get(f"{name}.{param}"))


def load_quantized(directory: str | Path, model: nn.Module, *, config: Any = None) -> nn.Module:
    """Rebuild the converted model saved by `save_quantized`.

    Args:
        directory: the artifact directory.
        model: the architecture: a fresh float model of the saved model's class (it is
            quantized in place with ``config`` or the saved config), or a QAT model of the
            same architecture (its encodings and weights are replaced by the saved ones).
        config: the `QuantConfig` to quantize a float ``model`` with (default: the saved one).

    Returns:
        The converted model, in eval mode, bit-identical in its outputs to the one saved.

    Raises:
        ExportError: a file is missing, or the saved state does not fit ``model``.

    Example:
        >>> int_model = load_quantized("artifacts/native", torchvision.models.resnet18())
    """
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise ExportError(f"load_quantized: {str(directory)!r} has no {missing[0]}")
    saved = json.loads((directory / "encodings.json").read_text())
    report = json.loads((directory / "report.json").read_text())
    if not any(isinstance(m, QuantModule) for m in model.modules()):
        config = config if config is not None else report.get("config")
        if config is None:
            raise ExportError(
                "load_quantized: the model is float and the artifact has no config; pass "
                "config=<the QuantConfig used> or a QAT model (quantize_model applied)"
            )
        from qat_lightning.surgery import quantize_model

        quantize_model(model, config)
    _load_encodings(model, saved)
    converted = convert(model)
    state = load_file(str(directory / "model.safetensors"))
    try:
        converted.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(
            f"load_quantized: the state in {str(directory)!r} does not fit this "
            f"{type(model).__name__}: {error}"
        ) from error
    return converted.eval()
