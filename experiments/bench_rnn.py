"""LSTM / GRU sequence classifiers: size and onnxruntime latency of our int8 export against
fp32, and against onnxruntime's own ``quantize_dynamic`` (DynamicQuantizeLSTM) of the same
fp32 ONNX; the QAT train step against the float step. Same run, same machine.

Model: Linear(64 -> 128) features, a 2-layer bidirectional LSTM or GRU (hidden 256), a
Linear head on the time mean; batch 8, 32 steps; random init. onnxruntime and torch with 2
threads. Prints one JSON object and a markdown table. Run: ``python experiments/bench_rnn.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from timing import cpu_model, round_robin
from torch import nn

from qat_lightning.export import export_onnx, save_quantized
from qat_lightning.surgery import calibrate


class Classifier(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.features = nn.Linear(64, 128)
        self.rnn = cell(128, 256, 2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.features(x))
        return self.head(out.mean(1))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(1).mean().backward()


def bench(cell: type[nn.RNNBase], runs: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    float_model = Classifier(cell)
    model = Classifier(cell)
    model.load_state_dict(float_model.state_dict())
    x = torch.randn(8, 32, 64)
    fp32_path = tmp / f"{cell.__name__}_fp32.onnx"
    torch.onnx.export(float_model.eval(), (x,), str(fp32_path), dynamo=False)
    ort_dynamic = tmp / f"{cell.__name__}_ort_dynamic.onnx"
    quantize_dynamic(str(fp32_path), str(ort_dynamic), weight_type=QuantType.QInt8)

    calibrate(model, [torch.randn(8, 32, 64) for _ in range(4)])
    model.train()
    float_model.train()
    steps = round_robin(
        {"float": lambda: train_step(float_model, x), "qat": lambda: train_step(model, x)},
        runs,
        2,
    )
    model.eval()
    ours = export_onnx(model, x, tmp / f"{cell.__name__}_int8.onnx")
    native = save_quantized(model, tmp / f"{cell.__name__}_native") / "model.safetensors"

    sessions = {"fp32": fp32_path, "ours_int8": ours, "ort_quantize_dynamic": ort_dynamic}
    feeds = {}
    for label, path in sessions.items():
        s = session(path)
        feeds[label] = (s, {s.get_inputs()[0].name: x.numpy()})
    latency = round_robin(
        {label: (lambda s=s, f=f: s.run(None, f)) for label, (s, f) in feeds.items()}, runs, 3
    )
    with torch.no_grad():
        reference = model(x).numpy()
    ours_out = feeds["ours_int8"][0].run(None, feeds["ours_int8"][1])[0]
    fp32_size = os.path.getsize(fp32_path)
    return {
        "cell": cell.__name__,
        "size_bytes": {
            "fp32_onnx": fp32_size,
            "ours_int8_onnx": os.path.getsize(ours),
            "ours_native": os.path.getsize(native),
            "ort_quantize_dynamic": os.path.getsize(ort_dynamic),
        },
        "size_ratio_vs_fp32": {
            "ours_int8_onnx": round(os.path.getsize(ours) / fp32_size, 4),
            "ours_native": round(os.path.getsize(native) / fp32_size, 4),
            "ort_quantize_dynamic": round(os.path.getsize(ort_dynamic) / fp32_size, 4),
        },
        "ort_latency_ms": {k: round(v * 1e3, 3) for k, v in latency.items()},
        "ort_latency_ratio_vs_fp32": {k: round(v / latency["fp32"], 3) for k, v in latency.items()},
        "train_step_ms": {k: round(v * 1e3, 2) for k, v in steps.items()},
        "qat_step_over_float": round(steps["qat"] / steps["float"], 3),
        "ours_onnx_vs_eval_max_abs": float(abs(ours_out - reference).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench(cell, args.runs, Path(tmp)) for cell in (nn.LSTM, nn.GRU)]
    print(json.dumps({"cpu": cpu_model(), "results": results}, indent=1))
    print(f"\nCPU: {cpu_model()}\n")
    print(
        "| cell | int8 ONNX / fp32 | native / fp32 | ORT dynamic / fp32 | ORT ms fp32 | "
        "ours | ORT dynamic | QAT step / float |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s, lat = r["size_ratio_vs_fp32"], r["ort_latency_ms"]
        print(
            f"| {r['cell']} | {s['ours_int8_onnx']:.3f} | {s['ours_native']:.3f} | "
            f"{s['ort_quantize_dynamic']:.3f} | {lat['fp32']:.2f} | {lat['ours_int8']:.2f} | "
            f"{lat['ort_quantize_dynamic']:.2f} | {r['qat_step_over_float']:.2f} |"
        )


if __name__ == "__main__":
    main()
