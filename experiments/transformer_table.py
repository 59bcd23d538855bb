"""Issue 13's acceptance table: the six transformers of `transformer_cases.py` at W8A8.

For each model (random init, small config, the default `QuantConfig`: per-channel symmetric
int8 weights, affine uint8 activations; PTQ with `calibrate` on a few random batches):

- layers quantized / float, from the `QuantizationReport` (each float row with its reason);
- SQNR (dB) of the eval-mode output (the integer simulation) against the float model;
- whether `convert(model)` equals the eval output bit for bit;
- top-1 (per-token argmax for language models) agreement of the ONNX model in onnxruntime
  with the eval output;
- multiply-accumulate ops in onnxruntime's optimized graph: integer kernels (QLinearMatMul,
  QGemm, MatMulInteger, ...) against float ones (MatMul, Gemm, FusedMatMul, Attention, ...);
- the int8 ONNX file's size over the fp32 ONNX's (``torch.onnx.export`` of the float model,
  with the int8 file's input names and dynamic axes).

A stage that fails is one line in its cell (``failed: ...``), never a missing row.

Usage: python experiments/transformer_table.py [--size small|tiny] [--models vit bert ...]
       [--out DIR] [--json PATH]
Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from timing import cpu_model
from transformer_cases import BUILDERS, Case, call, case

from qat_lightning import calibrate, convert, export_onnx
from qat_lightning.export import OnnxModel

INTEGER_MAC = (
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
    "ConvInteger", "QAttention", "DynamicQuantizeMatMul", "QOrderedMatMul",
)  # fmt: skip
FLOAT_MAC = (
    "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "FusedConv", "ConvTranspose",
    "Attention", "MultiHeadAttention", "Einsum", "MatMulNBits",
)  # fmt: skip


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``, in dB."""
    noise = (reference.double() - output.double()).pow(2).mean()
    return float(10 * torch.log10(reference.double().pow(2).mean() / noise))


def optimized_ops(path: Path) -> Counter:
    """Node types of the graph onnxruntime runs after its optimizations (ORT_ENABLE_ALL)."""
    optimized = path.with_name(path.stem + "_optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def mac_counts(ops: Counter) -> dict[str, int]:
    return {
        "integer": sum(ops[op] for op in INTEGER_MAC),
        "float": sum(ops[op] for op in FLOAT_MAC),
    }


def export_fp32(model: torch.nn.Module, example: Any, path: Path, like: Path | None = None) -> str:
    """``torch.onnx.export`` of the float model on ``example`` to one file, with the input
    names and dynamic axes of the ONNX at ``like`` if given (the int8 export: batch, and
    sequence for token inputs), so that both files serve the same shapes; returns the exporter
    used: ``dynamo``, or ``torchscript`` where torch.export cannot trace the model
    (``nn.Transformer`` branches on its mask's values).

    The axes matter for size: a model that slices a constant by the sequence length
    (Lightning's demo indexes its 5000-row positional table) keeps the whole constant when
    the length is dynamic, and one row when the exporter may fix it."""
    args, kwargs = _args_kwargs(example)
    names, axes = _dynamic_inputs(like) if like is not None else (None, None)
    try:
        torch.onnx.export(
            model,
            args,
            str(path),
            kwargs=kwargs,
            input_names=names,
            dynamic_axes=axes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        return "dynamo"
    except Exception:  # torch.export's tracing; the legacy exporter traces
        torch.onnx.export(
            model,
            args + ((kwargs,) if kwargs else ()),
            str(path),
            input_names=names,
            dynamic_axes=axes,
            dynamo=False,
        )
        return "torchscript"


def _dynamic_inputs(path: Path) -> tuple[list[str], dict[str, dict[int, str]]]:
    """Input names of the ONNX at ``path`` and, per input, its symbolic axes."""
    inputs = onnx.load(str(path), load_external_data=False).graph.input
    axes = {
        i.name: {k: d.dim_param for k, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param}
        for i in inputs
    }
    return [i.name for i in inputs], axes


def _args_kwargs(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, tuple):
        return batch, {}
    return (batch,), {}


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def float_rows(report) -> list[dict[str, str]]:
    """The report's rows left float, each with its type and reason."""
    return [
        {"name": r.name, "type": r.before, "note": r.note}
        for r in report.rows
        if r.status == "float"
    ]


def measure(
    c: Case, out: Path, calibration_batches: int, batch: int, test_batch: int
) -> dict[str, Any]:
    """Every column of the table for one case (a failing stage records its error)."""
    torch.manual_seed(0)
    model = c.build().eval()
    reference = copy.deepcopy(model).eval()
    row: dict[str, Any] = {"model": c.name, "class": type(model).__name__}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = calibrate(model, [c.batch(batch, seed) for seed in range(calibration_batches)])
    row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    row["counts"] = report.counts
    row["float_rows"] = float_rows(report)
    row["float_types"] = dict(Counter(r["type"] for r in row["float_rows"]))
    model.eval()
    test = c.batch(test_batch, 1000)
    with torch.no_grad():
        integer = c.logits(call(model, test))
        row["sqnr_db"] = round(sqnr_db(c.logits(call(reference, test)), integer), 2)
        try:
            converted = convert(model)
            row["convert_equals_eval"] = torch.equal(c.logits(call(converted, test)), integer)
        except Exception as err:  # reported in the table
            row["convert_equals_eval"] = None
            row["convert_error"] = _error(err)
    path = out / f"{c.name}_int8.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, c.batch(2, 7), path)
        args, kwargs = _args_kwargs(test)
        served = c.logits(OnnxModel(path)(*args, **kwargs))
        row["ort_agreement"] = float((served.argmax(-1) == integer.argmax(-1)).float().mean())
        row["ort_samples"] = int(integer.shape[0])
        row["optimized_ops"] = dict(optimized_ops(path))
        row["mac_ops"] = mac_counts(Counter(row["optimized_ops"]))
        row["int8_bytes"] = path.stat().st_size
    except Exception as err:  # reported in the table
        row["export_error"] = _error(err)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp32 = out / f"{c.name}_fp32.onnx"
            like = path if path.exists() else None
            row["fp32_exporter"] = export_fp32(reference, c.batch(2, 7), fp32, like)
            row["fp32_dynamic_axes"] = like is not None
        row["fp32_bytes"] = fp32.stat().st_size
        if "int8_bytes" in row:
            row["size_ratio"] = round(row["int8_bytes"] / row["fp32_bytes"], 4)
    except Exception as err:  # reported in the table
        row["fp32_export_error"] = _error(err)
    return row


def print_table(figures: dict) -> None:
    print(f"\n{figures['cpu']}, torch {figures['torch']}, onnxruntime {figures['onnxruntime']}")
    print(
        "| model | layers quantized / float | float layers (types) | SQNR dB | convert == eval "
        "| ORT agreement | integer / float MAC ops in ORT | int8 / fp32 size |"
    )
    print("|---|---:|---|---:|:-:|---:|---:|---:|")
    for r in figures["rows"]:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error']} | | | | | | |")
            continue
        counts = r["counts"]
        layers = f"{counts['quantized'] + counts['fused']} / {counts['float']}"
        types = ", ".join(f"{n}x {t}" for t, n in sorted(r["float_types"].items())) or "-"
        same = {True: "yes", False: "**no**", None: f"failed: {r.get('convert_error')}"}
        agree = (
            f"{r['ort_agreement']:.4f} ({'per token' if r['per_token'] else 'top-1'})"
            if "ort_agreement" in r
            else f"failed: {r.get('export_error')}"
        )
        macs = f"{r['mac_ops']['integer']} / {r['mac_ops']['float']}" if "mac_ops" in r else "-"
        size = f"{100 * r['size_ratio']:.1f} %" if "size_ratio" in r else "-"
        print(
            f"| {r['model']} | {layers} | {types} | {r['sqnr_db']:.1f} "
            f"| {same[r['convert_equals_eval']]} | {agree} | {macs} | {size} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--models", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--test-batch", type=int, default=64, help="samples compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the ONNX files here")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="transformer_table_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        c = case(name, args.size)
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            row = measure(c, out, args.calibration_batches, args.batch, args.test_batch)
        except Exception as err:  # one model failing is one row saying so
            row = {"model": name, "error": _error(err)}
        rows.append(row | {"per_token": c.per_token})
    figures = {
        "bench": "transformer_table",
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "size": args.size,
        "scheme": "W8A8 (QuantConfig defaults), PTQ on "
        f"{args.calibration_batches} random batches of {args.batch}",
        "out": str(out),
        "rows": rows,
    }
    line = json.dumps(figures, default=str)
    if args.json is not None:
        args.json.write_text(line)
    print(line)
    print_table(figures)


if __name__ == "__main__":
    main()
