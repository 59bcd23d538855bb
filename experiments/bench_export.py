"""Latency and size of our int8 ONNX against fp32 and onnxruntime's own static quantization.

resnet18 (torchvision, random init with BatchNorm statistics from a few batches), 224 px,
batch 8; onnxruntime with 2 intra-op threads, torch with 2 threads. Median latency of:

- fp32 eager torch;
- fp32 onnxruntime (torch.onnx.export of the float model);
- our int8 QDQ ONNX (quantize_model + calibration + export_onnx) in onnxruntime;
- ``onnxruntime.quantization.quantize_static`` (QDQ, per_channel=True) of the same fp32 ONNX,
  calibrated on the same batches.

Prints one JSON object and a markdown table. Run: ``python experiments/bench_export.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from timing import round_robin

from qat_lightning.export import export_onnx
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import QuantConfig, quantize_model


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with every graph optimization, ``threads`` intra-op threads;
    the optimized graph is written to ``optimized`` when given."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def float_model(calibration: list[torch.Tensor]) -> torch.nn.Module:
    """resnet18, random init, BatchNorm statistics averaged over the calibration batches."""
    model = torchvision.models.resnet18(weights=None)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    return model.eval()


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a list of feeds (input name -> array)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument(
        "--activations",
        choices=["u8", "s8"],
        default="u8",
        help="activation codes of our export: affine uint8 (default) or affine int8",
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the ONNX files here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shape = (args.batch, 3, args.size, args.size)
    calibration = [torch.randn(shape) for _ in range(args.calibration_batches)]
    x = torch.randn(shape)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_export_"))
    out.mkdir(parents=True, exist_ok=True)

    model = float_model(calibration)
    fp32_path = out / "resnet18_fp32.onnx"
    torch.onnx.export(
        model, (x,), str(fp32_path), dynamo=True, input_names=["input"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, external_data=False,
    )  # fmt: skip

    qat = float_model(calibration)
    signed = args.activations == "s8"
    config = QuantConfig(inputs={"bits": 8, "symmetric": False, "signed": signed})
    quantize_model(qat, config)
    with ExitStack() as stack, torch.no_grad():
        for module in qat.modules():
            if isinstance(module, QuantModule):
                stack.enter_context(module.compute_encodings())
        for batch in calibration:
            qat(batch)
    ours_path = export_onnx(qat, x, out / "resnet18_int8_ours.onnx", input_names=["input"])

    static_path = out / "resnet18_int8_quantize_static.onnx"
    quantize_static(
        str(fp32_path), str(static_path), FeedReader([{"input": b.numpy()} for b in calibration]),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )  # fmt: skip

    feed = {"input": x.numpy()}
    results: dict[str, dict] = {"fp32 eager torch": {"bytes": fp32_path.stat().st_size}}
    fns = {"fp32 eager torch": torch.no_grad()(lambda: model(x))}
    for label, path in (
        ("fp32 onnxruntime", fp32_path),
        ("int8 ours (onnxruntime)", ours_path),
        ("int8 quantize_static (onnxruntime)", static_path),
    ):
        optimized = out / (path.stem + "_optimized.onnx")
        sess = session(path, args.threads, optimized)
        fns[label] = lambda sess=sess: sess.run(None, feed)
        results[label] = {
            "bytes": path.stat().st_size,
            "optimized_ops": dict(Counter(n.op_type for n in onnx.load(optimized).graph.node)),
        }
    for label, seconds in round_robin(fns, args.runs, warmup=2).items():
        results[label]["ms"] = seconds * 1000

    eager = results["fp32 eager torch"]["ms"]
    fp32_bytes = results["fp32 onnxruntime"]["bytes"]
    ours, static = results["int8 ours (onnxruntime)"], results["int8 quantize_static (onnxruntime)"]
    summary = {
        "setup": vars(args)
        | {"out": str(out), "onnxruntime": ort.__version__, "torch": torch.__version__},
        "results": results,
        "goals": {
            "ours_ms <= quantize_static_ms": ours["ms"] <= static["ms"],
            "speedup_vs_fp32_eager": round(eager / ours["ms"], 2),
            "speedup >= 2.2": eager / ours["ms"] >= 2.2,
            "size_ratio_vs_fp32": round(ours["bytes"] / fp32_bytes, 4),
            "size <= 26%": ours["bytes"] / fp32_bytes <= 0.26,
        },
    }
    print(json.dumps(summary, indent=1, default=str))
    print("\n| model | median ms | size MB | vs fp32 eager |\n|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['ms']:.1f} | {r['bytes'] / 1e6:.2f} | {eager / r['ms']:.2f}x |")


if __name__ == "__main__":
    main()
