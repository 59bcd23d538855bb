"""Transformers: the QAT train step over float, and the int8 ONNX's latency in onnxruntime.

The small ViT and BERT-tiny of `transformer_cases.py` (random init), batch 8, in one run:

1. Train step (SGD, forward + backward + update, the same fixed batch for every side): float;
   this package at W8A8 (the `QuantConfig` defaults, calibrated, observers tracking as the
   callback's QAT runs them); torch.ao eager QAT (``prepare_qat`` with the x86 qconfig on the
   model's exact ``nn.Linear`` modules, the only layer type its eager QAT covers here: no
   attention matmul, no ``MultiheadAttention`` in-projection, no input quantization).
   Round-robin rounds; medians and ratios over float.
2. Latency in onnxruntime (2 intra-op threads, batch 8): the fp32 ONNX (``torch.onnx.export``
   of the float model); ours (``export_onnx`` of the calibrated model, with its default
   ``weights="exact"``, and with ``weights="int8"``: signed weights for onnxruntime's u8 x s8
   kernels, as ``quantize_static`` stores them, exact on CPUs with VNNI); onnxruntime's own
   ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, calibrated on the
   same batches) and ``quantize_dynamic`` (int8 weights) of the same fp32 file. Round-robin
   runs; each int8 model's top-1 agreement with the fp32 ONNX on the timed batch.

Usage: python experiments/bench_transformer.py [--models vit bert] [--size small|tiny]
       [--steps 6] [--runs 20]
Prints one JSON line, then two markdown tables.
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

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_export import FeedReader, session
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from timing import cpu_model, round_robin
from torch import nn
from transformer_cases import Case, call, case
from transformer_table import export_fp32, mac_counts

from qat_lightning import calibrate, export_onnx
from qat_lightning.quant import Quantizer


def ours(model: nn.Module, batches: list[Any]) -> nn.Module:
    """W8A8 as the callback's QAT runs it: calibrated, then observers keep tracking."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(model, batches)
    for quantizer in model.modules():
        if isinstance(quantizer, Quantizer):
            quantizer.enable_observer(quantizer.scheme.observer in ("minmax", "moving_minmax"))
    return model


def torch_ao(model: nn.Module) -> tuple[nn.Module, int]:
    """torch.ao eager QAT on the model's exact ``nn.Linear`` modules; returns (model, how many)."""
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    qconfig = get_default_qat_qconfig("x86")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.qconfig = qconfig
    model.train()
    return prepare_qat(model, inplace=True), len(linears)


class Step:
    """One SGD step on a fixed batch (the same for every side); keeps the last loss."""

    def __init__(self, c: Case, model: nn.Module, batch: Any) -> None:
        self.case, self.model, self.batch, self.loss = c, model.train(), batch, None
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.case.loss(call(self.model, self.batch), seed=0)
        loss.backward()
        self.optimizer.step()
        self.loss = float(loss.detach())


def feed(sess: ort.InferenceSession, batch: Any) -> dict[str, np.ndarray]:
    """The session's inputs by name from a tensor, a tuple (positional) or a dict."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(batch, dict):
        return {name: batch[name].numpy() for name in names}
    values = batch if isinstance(batch, tuple) else (batch,)
    return {name: v.numpy() for name, v in zip(names, values, strict=True)}


def train_steps(c: Case, base: nn.Module, batches: list[Any], args) -> dict[str, Any]:
    sides = {"float": copy.deepcopy(base), "qat_lightning": ours(copy.deepcopy(base), batches)}
    sides["torch_ao"], ao_linears = torch_ao(copy.deepcopy(base))
    steps = {name: Step(c, model, batches[0]) for name, model in sides.items()}
    median = round_robin(steps, args.steps, args.warmup)
    return {
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_over_float": {k: round(v / median["float"], 3) for k, v in median.items()},
        "loss_after_steps": {k: round(s.loss, 4) for k, s in steps.items()},
        "torch_ao_linears": ao_linears,
        "linears": sum(isinstance(m, nn.Linear) for m in base.modules()),
    }


def latencies(c: Case, base: nn.Module, batches: list[Any], out: Path, args) -> dict[str, Any]:
    float_model = copy.deepcopy(base).eval()
    example = batches[0]
    fp32 = out / f"{c.name}_fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exporter = export_fp32(float_model, example, fp32)
        qat = ours(copy.deepcopy(base), batches).eval()
        paths = {"fp32 onnxruntime": fp32}
        paths["int8 ours"] = export_onnx(qat, example, out / f"{c.name}_int8_ours.onnx")
        paths["int8 ours, weights=int8"] = export_onnx(
            qat, example, out / f"{c.name}_int8_ours_s8.onnx", weights="int8"
        )
    probe = session(fp32, args.threads)
    static = out / f"{c.name}_int8_quantize_static.onnx"
    quantize_static(
        str(fp32), str(static), FeedReader([feed(probe, b) for b in batches]),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )  # fmt: skip
    paths["int8 quantize_static"] = static
    dynamic = out / f"{c.name}_int8_quantize_dynamic.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8)
    paths["int8 quantize_dynamic"] = dynamic

    test = c.batch(args.batch, 99)  # the fp32 file has the example's (static) shapes
    results: dict[str, dict[str, Any]] = {}
    fns = {}
    outputs = {}
    for label, path in paths.items():
        optimized = out / (path.stem + "_optimized.onnx")
        sess = session(path, args.threads, optimized)
        inputs = feed(sess, test)
        fns[label] = lambda sess=sess, inputs=inputs: sess.run(None, inputs)
        outputs[label] = sess.run(None, inputs)[0]
        ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        results[label] = {"bytes": path.stat().st_size, "mac_ops": mac_counts(ops)}
    for label, seconds in round_robin(fns, args.runs, warmup=2).items():
        results[label]["ms"] = round(seconds * 1000, 3)
    reference = outputs["fp32 onnxruntime"].reshape(-1, c.classes).argmax(-1)
    for label, result in results.items():
        top1 = outputs[label].reshape(-1, c.classes).argmax(-1)
        result["agreement_with_fp32"] = float((top1 == reference).mean())
        result["size_ratio"] = round(result["bytes"] / results["fp32 onnxruntime"]["bytes"], 4)
    base_ms = results["fp32 onnxruntime"]["ms"]
    for result in results.values():
        result["speedup_over_fp32"] = round(base_ms / result["ms"], 3)
    return {"fp32_exporter": exporter, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["vit", "bert"])
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed train-step rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="timed onnxruntime rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the ONNX files here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_transformer_"))
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "bench": "transformer",
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "setup": {k: str(v) for k, v in vars(args).items()} | {"out": str(out)},
        "goals": "step <= 1.4x float; int8 ours latency <= onnxruntime's own quantization's",
        "models": {},
    }
    for name in args.models:
        c = case(name, args.size)
        print(f"{name}: train steps ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        base = c.build()
        batches = [c.batch(args.batch, seed) for seed in range(args.calibration_batches)]
        entry = {"train_step": train_steps(c, base, batches, args)}
        print(f"{name}: onnxruntime latency ...", file=sys.stderr, flush=True)
        entry["latency"] = latencies(c, base, batches, out, args)
        results = entry["latency"]["results"]
        own = min(results["int8 quantize_static"]["ms"], results["int8 quantize_dynamic"]["ms"])
        fastest_ours = min(results["int8 ours"]["ms"], results["int8 ours, weights=int8"]["ms"])
        entry["goals_met"] = {
            "step <= 1.4x float": entry["train_step"]["ratio_over_float"]["qat_lightning"] <= 1.4,
            "int8 ours <= best of quantize_static / quantize_dynamic": fastest_ours <= own,
        }
        figures["models"][name] = entry
    print(json.dumps(figures))
    print_tables(figures)


def print_tables(figures: dict) -> None:
    print(f"\n{figures['cpu']}, torch {figures['torch']}, onnxruntime {figures['onnxruntime']}")
    print("\n| model | side | step s | over float | loss after the steps |")
    print("|---|---|---:|---:|---:|")
    for name, entry in figures["models"].items():
        steps = entry["train_step"]
        for side, seconds in steps["median_step_s"].items():
            ratio = steps["ratio_over_float"][side]
            loss = steps["loss_after_steps"][side]
            print(f"| {name} | {side} | {seconds:.4f} | {ratio:.2f} | {loss} |")
    print("\n| model | onnxruntime model | ms | over fp32 | size | integer / float MACs | top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, entry in figures["models"].items():
        for label, r in entry["latency"]["results"].items():
            macs = f"{r['mac_ops']['integer']} / {r['mac_ops']['float']}"
            print(
                f"| {name} | {label} | {r['ms']:.2f} | {r['speedup_over_fp32']:.2f}x "
                f"| {100 * r['size_ratio']:.1f} % | {macs} | {r['agreement_with_fp32']:.4f} |"
            )


if __name__ == "__main__":
    main()
