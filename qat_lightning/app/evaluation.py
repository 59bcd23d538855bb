"""What ``qat-train`` measures after training: test accuracy of the QAT model (eval mode: the
integer simulation), of the exported ONNX model in onnxruntime, their top-1 agreement, per-quantizer
health and the sizes of what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_accuracy

from qat_lightning.callback import QATCallback
from qat_lightning.callback.health import HealthProbe, named_quantizers
from qat_lightning.nn import fake_quant_eval
from qat_lightning.surgery.modes import kept_modes


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the whole loader, in eval mode; each submodule keeps its mode
    afterwards (a training that follows must not run in eval mode)."""
    device = next(model.parameters()).device
    logits, labels = [], []
    with kept_modes(model):
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def onnx_predict(path: Path, loader: DataLoader) -> np.ndarray:
    """Logits of the exported model in onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x.numpy()})[0] for x, _ in loader])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy over all samples (torchmetrics' micro-averaged multiclass accuracy)."""
    scores = torch.from_numpy(logits)
    return float(
        multiclass_accuracy(
            scores, torch.from_numpy(labels), num_classes=scores.shape[1], average="micro"
        )
    )


@torch.no_grad()
def quant_health(module: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per quantizer: bits, mean scale and zero point, clip rate and SQNR on the batch ``x``.

    Quantizers are named from ``module`` (the LightningModule), so the names carry the same
    ``model.`` prefix that ``quant.overrides`` and ``quant.skip`` match. Runs the fake-quant
    arithmetic (`fake_quant_eval`): the probe reads what reaches each quantizer, and eval
    mode's integer path calls none of them.
    """
    probe = HealthProbe(module).attach()
    with kept_modes(module), torch.no_grad(), fake_quant_eval():
        module(x.to(next(module.parameters()).device))
    metrics = probe.detach()
    rows = []
    for name, quantizer in named_quantizers(module):
        figures = {
            key: metrics.get(f"quant/{name}/{key}")
            for key in ("scale", "zero_point", "clip_rate", "sqnr_db")
        }
        if figures["scale"] is None:
            continue
        kind = "param" if ".param_quantizers." in f".{name}." else "activation"
        rows.append({"quantizer": name, "kind": kind, "bits": quantizer.scheme.bits, **figures})
    return rows


def nbytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the ONNX model's initializers (weights, scales, zero points): its size without
    the graph and the exporter's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def evaluate(model: nn.Module, test: DataLoader, qat: QATCallback) -> dict[str, Any]:
    """Fake-quant accuracy, exported-ONNX accuracy and their top-1 agreement on ``test``."""
    for _, quantizer in named_quantizers(model):  # evaluation must not move the encodings
        quantizer.enable_observer(False)
    qat_logits, labels = predict(model, test)
    results: dict[str, Any] = {
        "qat_accuracy": accuracy(qat_logits, labels),
        "onnx_accuracy": None,
        "agreement": None,
        "test_samples": len(labels),
    }
    if "onnx" in qat.export_paths:
        onnx_logits = onnx_predict(qat.export_paths["onnx"], test)
        results["onnx_accuracy"] = accuracy(onnx_logits, labels)
        results["agreement"] = float((onnx_logits.argmax(1) == qat_logits.argmax(1)).mean())
    return results
