"""The native artifact: ``model.safetensors`` + ``encodings.json`` + ``report.json`` +
``manifest.json``, published as a whole directory (a temp directory beside it, one rename).

- ``model.safetensors``: the converted model's state: integer weight codes (int8; 4-bit packed
  two per byte), int32 biases, scales and zero points, and the float parameters of layers left
  float. Loading it never unpickles anything.
- ``encodings.json``: every quantized tensor's encoding, readable by other tools (in the spirit
  of AIMET's encodings file): ``{"activation_encodings": {...}, "param_encodings": {...}}``
  keyed by ``<module>.input.<i>`` / ``<module>.output`` / ``<module>.<param>``.
- ``report.json``: the layer table (`layer_report`) and the `QuantConfig` used, if known.
- ``manifest.json``: the sha256 of the three files; `load_quantized` refuses a missing,
  corrupt or mixed file, naming it.

How `load_quantized` rebuilds the architecture: the artifact holds tensors, not code, so the
caller supplies the model's architecture: a fresh float model of the same class (surgery is
re-run with the saved config) or a QAT model of the same architecture. Its quantizers take
the saved encodings, `convert` builds the integer modules, and the saved state replaces every
tensor, so the outputs are bit-identical to the saved converted model. The architecture may
also be a LightningModule around the saved model (or the saved model's child): the module
paths the encodings name say which submodule the artifact belongs to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qat_lightning.export._files import ExportError, atomic_directory
from qat_lightning.export.convert import _set_submodule, convert, is_converted
from qat_lightning.export.encoding_entries import apply_entry, entry, quantizer_entry
from qat_lightning.export.modules import IntegerEmbedding, IntegerLayer
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.export.report import layer_report
from qat_lightning.nn.base import QuantModule
from qat_lightning.quant import QuantScheme

FORMAT = "qat_lightning.native/1"
FILES = ("model.safetensors", "encodings.json", "report.json")
MANIFEST = "manifest.json"  # {"format", "files": {name: {"sha256": hex}}} of FILES


# -- encodings ---------------------------------------------------------------------------------
def encodings(model: nn.Module) -> dict[str, Any]:
    """Every encoding of a converted model, as the JSON-ready dict of ``encodings.json``."""
    activations: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedOp):
            inner = module.module
            for i, q in enumerate(inner.input_quantizers):
                if q is not None:
                    activations[f"{name}.input.{i}"] = quantizer_entry(f"{name}.input.{i}", q)
            for param, q in inner.param_quantizers.items():
                if q is not None:
                    params[f"{name}.{param}"] = quantizer_entry(f"{name}.{param}", q)
        elif isinstance(module, (IntegerLayer, IntegerEmbedding)):
            for i, q in enumerate(module.input_quantizers):
                if q is not None:
                    activations[f"{name}.input.{i}"] = quantizer_entry(f"{name}.input.{i}", q)
            w = f"{name}.weight"
            params[w] = entry(
                w, module.weight_scheme, module.weight_scale, module.weight_zero_point
            )
            if getattr(module, "bias_codes", None) is not None:
                scale = module.accumulator_scale().float()
                params[f"{name}.bias"] = entry(
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
            activations[f"{name}.output"] = quantizer_entry(f"{name}.output", outs[0])
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


def _replaceable(directory: Path) -> bool:
    """An existing directory may be replaced: empty, or an earlier artifact."""
    names = {p.name for p in directory.iterdir()}
    return MANIFEST in names or names <= set(FILES)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_quantized(model: nn.Module, directory: str | Path, *, config: Any = None) -> Path:
    """Write the native artifact of ``model`` to ``directory``.

    Args:
        model: a calibrated QAT model (converted here) or the output of `convert`.
        directory: where ``model.safetensors``, ``encodings.json``, ``report.json`` and
            ``manifest.json`` (their sha256 hashes) go. It must be new, empty, or an earlier
            artifact, which is replaced whole.
        config: the `QuantConfig` (or dict) ``quantize_model`` used; saved so that
            `load_quantized` can rebuild from a fresh float model.

    Returns:
        ``directory`` as a Path. The files are written into a temp directory beside it,
        which is renamed to ``directory`` once all are complete: a reader never sees a mix
        of two exports, and a failure leaves the old artifact (or nothing) and no temp files.

    Raises:
        ExportError: the directory is not writable, holds other files (names it), or
            writing failed.
    """
    directory = Path(directory)
    converted = model if is_converted(model) else convert(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in converted.state_dict().items()}
    report = {"format": FORMAT, "config": _config_dict(config), **layer_report(converted)}
    texts = [json.dumps(encodings(converted), indent=1), json.dumps(report, indent=1)]
    with atomic_directory(directory, "save_quantized", _replaceable) as temp:
        try:
            save_file(state, str(temp / FILES[0]), metadata={"format": FORMAT})
            for name, text in zip(FILES[1:], texts, strict=True):
                (temp / name).write_text(text + "\n")
            files = {name: {"sha256": _sha256(temp / name)} for name in FILES}
            manifest = {"format": FORMAT, "files": files}
            (temp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        except OSError as error:
            raise ExportError(
                f"save_quantized: writing {str(directory)!r} failed: {error}"
            ) from error
    return directory


# -- load ----------------------------------------------------------------------------------------
def _load_encodings(model: nn.Module, saved: dict[str, Any]) -> None:
    acts, params = saved["activation_encodings"], saved["param_encodings"]
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        for i, q in enumerate(module.input_quantizers):
            apply_entry(q, acts.get(f"{name}.input.{i}"))
        if len(module.output_quantizers):
            apply_entry(module.output_quantizers[0], acts.get(f"{name}.output"))
        for param, q in module.param_quantizers.items():
            apply_entry(q, params.get(f"{name}.{param}"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(
            f"load_quantized: {str(path)!r} is not readable JSON ({error})"
        ) from error
    if not isinstance(value, dict):
        raise ExportError(f"load_quantized: {str(path)!r} holds no JSON object")
    return value


def _check_manifest(directory: Path) -> None:
    """Every file is there and has the hash the manifest recorded when it was written."""
    if not (directory / MANIFEST).is_file():
        raise ExportError(
            f"load_quantized: {str(directory)!r} has no {MANIFEST} (not an artifact written "
            "by save_quantized, or an incomplete one): export it again"
        )
    files = _read_json(directory / MANIFEST).get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise ExportError(
            f"load_quantized: {str(directory / MANIFEST)!r} does not list the files {FILES}"
        )
    for name in FILES:
        path = directory / name
        if not path.is_file():
            raise ExportError(f"load_quantized: {str(directory)!r} has no {name}")
        if _sha256(path) != files[name].get("sha256"):
            raise ExportError(
                f"load_quantized: {str(path)!r} does not match its sha256 in {MANIFEST}: the "
                "artifact is corrupt or mixes two exports; export it again"
            )


def _saved_module_paths(saved: dict[str, Any]) -> list[str]:
    """The module paths the saved encodings name (weights first: surgery adds no weights)."""
    if saved["param_encodings"]:
        return sorted({name.rpartition(".")[0] for name in saved["param_encodings"]})
    paths = set()
    for name in saved["activation_encodings"]:
        head, _, tail = name.rpartition(".")
        paths.add(head.rpartition(".")[0] if tail.isdigit() else head)
    return sorted(paths)


def _locate(model: nn.Module, paths: list[str]) -> tuple[str, str]:
    """Where the artifact goes in ``model``: (the submodule to load into, the prefix to strip
    from the saved names). An artifact saved from a LightningModule's child (as `QATCallback`
    exports) loads into the LightningModule, and one saved from a wrapper into its child."""
    modules = {name for name, _ in model.named_modules()}

    def fits(prefix: str, names: list[str]) -> bool:
        return all((f"{prefix}.{n}" if prefix and n else prefix or n) in modules for n in names)

    if not paths or fits("", paths):
        return "", ""
    inside = [name for name in modules if name and fits(name, paths)]
    if len(inside) > 1:
        raise ExportError(
            f"load_quantized: the artifact fits several submodules of this "
            f"{type(model).__name__} ({sorted(inside)}); pass the one it was saved from"
        )
    if inside:
        return inside[0], ""
    parts = paths[0].split(".")
    for k in range(1, len(parts)):
        prefix = ".".join(parts[:k])
        stripped = [p[len(prefix) + 1 :] for p in paths if p.startswith(prefix + ".")]
        if len(stripped) == len(paths) and fits("", stripped):
            return "", prefix
    return "", ""  # no better guess: the strict state load below names what does not fit


def _strip(names: dict[str, Any], prefix: str) -> dict[str, Any]:
    if not prefix:
        return names
    return {k[len(prefix) + 1 :]: v for k, v in names.items() if k.startswith(prefix + ".")}


def load_quantized(directory: str | Path, model: nn.Module, *, config: Any = None) -> nn.Module:
    """Rebuild the converted model saved by `save_quantized`.

    Args:
        directory: the artifact directory.
        model: the architecture: a fresh float model of the saved model's class (it is
            quantized in place with ``config`` or the saved config), or a QAT model of the
            same architecture (its encodings and weights are replaced by the saved ones).
            It may also be a LightningModule (or any wrapper) whose child the artifact was
            saved from, as `QATCallback` exports: that child is replaced by the converted
            one in place and the wrapper is returned; or the child of the module saved.
        config: the `QuantConfig` to quantize a float ``model`` with (default: the saved one).

    Returns:
        The converted model, in eval mode, bit-identical in its outputs to the one saved.

    Raises:
        ExportError: a file is missing, corrupt or does not match the manifest's hash (names
            the file), or the saved state does not fit ``model``.

    Example:
        >>> int_model = load_quantized("artifacts/native", torchvision.models.resnet18())
    """
    directory = Path(directory)
    _check_manifest(directory)
    saved = _read_json(directory / "encodings.json")
    report = _read_json(directory / "report.json")
    if not {"activation_encodings", "param_encodings"} <= set(saved):
        raise ExportError(f"load_quantized: {str(directory / 'encodings.json')!r} has no encodings")
    try:
        state = load_file(str(directory / "model.safetensors"))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ExportError(
            f"load_quantized: {str(directory / 'model.safetensors')!r} is not a readable "
            f"safetensors file ({error})"
        ) from error
    where, strip = _locate(model, _saved_module_paths(saved))
    if strip:
        saved = {k: _strip(v, strip) if isinstance(v, dict) else v for k, v in saved.items()}
        state = _strip(state, strip)
    target = model.get_submodule(where) if where else model
    if not any(isinstance(m, QuantModule) for m in target.modules()):
        config = config if config is not None else report.get("config")
        if config is None:
            raise ExportError(
                "load_quantized: the model is float and the artifact has no config; pass "
                "config=<the QuantConfig used> or a QAT model (quantize_model applied)"
            )
        from qat_lightning.surgery import quantize_model

        quantize_model(target, config)
    _load_encodings(target, saved)
    converted = convert(target)
    try:
        converted.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(
            f"load_quantized: the state in {str(directory)!r} does not fit this "
            f"{type(target).__name__}: {error}"
        ) from error
    if where:
        _set_submodule(model, where, converted)
        return model.eval()
    return converted.eval()
