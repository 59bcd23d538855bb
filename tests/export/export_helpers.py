"""Models, calibration and onnxruntime helpers shared by the export tests."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from qat_lightning.export.qdq import FrozenQuantizer
from qat_lightning.nn import QuantConv2d, QuantLinear, QuantModule
from qat_lightning.nn.fused import QuantConvBnReLU2d
from qat_lightning.quant import QuantScheme

U8 = QuantScheme(bits=8, symmetric=False, signed=False)
W8 = QuantScheme(bits=8, granularity="per_channel")
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger")


class TinyLM(nn.Module):
    """Embedding, a residual GELU MLP and a head: the per-group / dynamic export tests' model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 50)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        return self.head(h + self.mlp(h))


def calibrate(model: nn.Module, batches) -> nn.Module:
    """Observe ``batches`` with every quantizer of ``model``; encodings fixed on exit."""
    model.eval()
    with ExitStack() as stack, torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantModule):
                stack.enter_context(module.compute_encodings())
        for batch in batches:
            model(*batch) if isinstance(batch, tuple) else model(batch)
    return model


def small_cnn(inputs: QuantScheme = U8, params: QuantScheme = W8, width: int = 16) -> nn.Sequential:
    """conv(+BN+ReLU fused) -> conv -> max pool -> flatten -> linear, 3x16x16 in, 10 out.

    Each activation is quantized once: the modules after the first take their input encoding
    from the producer (input quantizer None), as model surgery leaves them.
    """
    torch.manual_seed(0)
    conv0, bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    first = QuantConvBnReLU2d.from_modules(conv0, bn, inputs, params)
    second = QuantConv2d.from_float(nn.Conv2d(width, width, 3, padding=1, stride=2), inputs, params)
    head = QuantLinear.from_float(nn.Linear(width * 4 * 4, 10), inputs, params)
    second.input_quantizers[0] = None
    head.input_quantizers[0] = None
    model = nn.Sequential(first, second, nn.MaxPool2d(2), nn.Flatten(), head)
    return calibrate(model, [torch.randn(32, 3, 16, 16) for _ in range(3)])


def ort_session(path: str | Path, optimized: str | Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(path: str | Path, *inputs: torch.Tensor) -> np.ndarray:
    session = ort_session(path)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)[0]


def optimized_op_types(path: str | Path, tmp_path: Path) -> Counter:
    """Node types of the graph onnxruntime runs after its optimizations."""
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized)
    return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def output_lsb(model: nn.Module) -> float:
    """The scale of the last frozen quantizer (the model's output grid) of a converted model."""
    return [m for m in model.modules() if isinstance(m, FrozenQuantizer)][-1].scale.item()


def agreement(a: np.ndarray, b: np.ndarray, lsb: float) -> tuple[float, float]:
    """(fraction of elements within one LSB, top-1 agreement)."""
    within = float((np.abs(a - b) <= lsb * 1.001).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return within, top1
