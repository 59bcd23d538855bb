"""`write_model_card`: the ``README.md`` of an export directory.

What the model is (class, how many layers compute in integers, the weight and activation
bitwidths), the final metrics when known, the per-layer table of `layer_report`, the files,
the ONNX model's inputs (each ``forward`` argument: dtype and shape, or the constant baked
in), and the lines that run it with `OnnxModel`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from qat_lightning.export._files import ExportError, atomic_paths
from qat_lightning.export.convert import convert, is_converted
from qat_lightning.export.onnx_io import INPUTS_KEY, scheme_summary
from qat_lightning.export.report import layer_report


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _example_inputs(onnx_path: Path) -> list[str]:
    """``name = torch.rand(1, 3, 32, 32)`` (or ``zeros(..., dtype=...)``) per graph input."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    lines = []
    for value in graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        shape = ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype.kind == "f":
            lines.append(f"{value.name} = torch.rand({shape})")
        else:
            lines.append(f"{value.name} = torch.zeros(({shape}), dtype=torch.{dtype.name})")
    return lines


def _inputs_table(onnx_path: Path) -> list[str]:
    """One row per ``forward`` argument of the export: a graph input's dtype and shape, or
    the constant the export baked in (from the file's ``qat_lightning.inputs``)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        entries = json.loads(props[INPUTS_KEY])
    except (KeyError, json.JSONDecodeError):
        return []
    rows = ["| input | dtype | shape |", "| --- | --- | --- |"]
    for entry in entries:
        if "dtype" in entry:
            shape = ", ".join(str(d) for d in entry["shape"])
            rows.append(f"| `{entry['name']}` | {entry['dtype']} | ({shape}) |")
        elif "constant" in entry:
            how = "its default" if entry.get("default") else "constant"
            rows.append(f"| `{entry['name']}` | {how}, baked in | `{entry['constant']!r}` |")
    return rows


def _bits(entries: list[dict[str, Any]]) -> str:
    bits = sorted({e["scheme"]["bits"] for e in entries})
    return "/".join(str(b) for b in bits) + "-bit" if bits else "none"


def _shown(path: Path, directory: Path | None) -> Path:
    """``path`` relative to the export directory when it lies inside it."""
    if directory is not None and Path(path).is_relative_to(directory):
        return Path(path).relative_to(directory)
    return Path(path)


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    model: nn.Module,
    paths: Mapping[str, Path] | None = None,
    metrics: Mapping[str, Any] | None = None,
    directory: Path | None = None,
) -> str:
    """The model card's markdown text (see `write_model_card`)."""
    converted = model if is_converted(model) else convert(model)
    report, schemes = layer_report(converted), scheme_summary(converted)
    totals, rows = report["totals"], report["layers"]
    share = f"{totals['compression']:.0%} of " if totals["compression"] else ""
    lines = [
        f"# {type(model).__name__}, quantized with qat_lightning",
        "",
        f"An integer model from quantization-aware training: {len(report['quantized_layers'])} "
        f"of {len(rows)} layers compute in integers ({_bits(schemes['params'])} weights, "
        f"{_bits(schemes['activations'])} activations); "
        f"{len(report['float_layers'])} stay float.",
        f"Weights take {totals['stored_bytes'] / 1024:.1f} KiB ({share}their "
        f"{totals['float_bytes'] / 1024:.1f} KiB in fp32).",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("Not recorded with this export.")
    lines += ["", "## Layers", "", "| layer | type | status | weight bits | params | bytes |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        bits = "-" if row["weight_bits"] is None else row["weight_bits"]
        lines.append(
            f"| {row['name'] or '<model>'} | {row['type']} | {row['status']} | {bits} "
            f"| {row['params']} | {row['stored_bytes']} |"
        )
    paths = dict(paths or {})
    if paths:
        lines += ["", "## Files", ""]
        for fmt, path in paths.items():
            kib = _size(Path(path)) / 1024
            lines.append(f"- `{_shown(path, directory)}` ({fmt}, {kib:.1f} KiB)")
    onnx_path = paths.get("onnx")
    if onnx_path is not None:
        name = _shown(onnx_path, directory)
        inputs = _example_inputs(Path(onnx_path))
        names = [line.split(" = ")[0] for line in inputs]
        call = ", ".join(names) if len(names) == 1 else ", ".join(f"{n}={n}" for n in names)
        table = _inputs_table(Path(onnx_path))
        if table:
            lines += ["", "## Inputs", "", *table]
        lines += ["", "## Run it (onnxruntime, CPU)", "", "```python"]
        lines += ["import torch", "from qat_lightning.export import OnnxModel", ""]
        lines += [f'model = OnnxModel("{name}")', *inputs, f"logits = model({call})", "```"]
    return "\n".join(lines) + "\n"


def write_model_card(
    directory: str | Path,
    model: nn.Module,
    paths: Mapping[str, Path] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/README.md``: a short model card for the exported ``model``.

    Args:
        directory: the export directory (the card's paths are relative to it).
        model: the exported model (a calibrated QAT model, converted here, or a converted one).
        paths: ``{format: path}`` of the files exported (``"onnx"`` adds the lines to run it).
        metrics: final metrics to show, e.g. ``{"val_acc": 0.97}``.

    Returns:
        The path of the card (written atomically).

    Raises:
        ExportError: the directory is not writable.
    """
    directory = Path(directory)
    text = model_card(model, paths, metrics, directory)
    with atomic_paths([directory / "README.md"], "write_model_card") as (temp,):
        try:
            temp.write_text(text)
        except OSError as error:
            raise ExportError(
                f"write_model_card: writing {str(directory)!r} failed: {error}"
            ) from error
    return directory / "README.md"
