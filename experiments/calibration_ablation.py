"""Calibration ablation, "after calibration only": W4A4 ResNet-20 with min/max, percentile and
MSE observers, no training step.

From a float checkpoint, for each observer: quantize a copy (the observer on the weights and
the activations), calibrate on the same first N training batches as `QATCallback` does
(train-mode forwards under no_grad, BatchNorm statistics restored), then report the test
accuracy of the quantized model in eval mode, which is the integer simulation the exported
model runs. The "after QAT" half of the ablation is a `qat-train` multirun (experiments/README).

Usage:
    python experiments/calibration_ablation.py --fp32 fp32.pt [--data-root DIR] [--bits 4]
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time

import torch
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from qat_lightning.app.datamodule import ImageDataModule
from qat_lightning.app.models import ResNetCifar
from qat_lightning.callback.calibration import non_quantizer_buffers, restore_buffers
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import quantize_model

OBSERVERS = ("minmax", "percentile", "mse")


def config(bits: int, observer: str) -> dict:
    """conf/quant/{inputs,params}/int4.yaml at ``bits``, with ``observer`` on both sides."""
    return {
        "inputs": {"bits": bits, "symmetric": False, "signed": False, "observer": observer},
        "params": {"bits": bits, "granularity": "per_channel", "axis": 0, "observer": observer},
    }


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """What QATCallback does before training: train-mode forwards inside every quantizer's
    `compute_encodings`, BatchNorm statistics restored after each batch."""
    saved = non_quantizer_buffers(model)
    model.train()
    with contextlib.ExitStack() as stack:
        for quantizer in (m for m in model.modules() if isinstance(m, Quantizer)):
            stack.enter_context(quantizer.compute_encodings())
        for x in batches:
            model(x)
            restore_buffers(model, saved)  # calibration must not move the BN statistics


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    metric = None
    for x, y in loader:
        logits = model(x)
        metric = metric or MulticlassAccuracy(logits.shape[1], average="micro")
        metric.update(logits, y)
    return float(metric.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", required=True, help="float ResNet-20 state_dict (fp32.pt)")
    parser.add_argument("--data-root", default="../shared/data/cifar10-partial")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--max-test", type=int, default=None, help="test images (all: None)")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = {"name": "cifar10", "root": args.data_root, "batch_size": 128, "val_fraction": 0.1}
    cfg |= {"augment": True, "max_train_samples": None, "max_test_samples": args.max_test}
    cfg |= {"eval_batch_size": 256}
    data = ImageDataModule(OmegaConf.create(cfg | {"num_workers": 0, "seed": 0}))
    data.setup()
    loader = data.train_dataloader()
    batches = [x for (x, _), _ in zip(loader, range(args.calibration_batches), strict=False)]
    float_model = ResNetCifar(in_channels=3, num_classes=10)
    float_model.load_state_dict(torch.load(args.fp32, map_location="cpu", weights_only=True))
    rows = [{"observer": "fp32", "accuracy": accuracy(float_model, data.test_dataloader())}]
    for observer in OBSERVERS:
        start = time.perf_counter()
        model = copy.deepcopy(float_model)
        quantize_model(model, config(args.bits, observer))
        calibrate(model, batches)
        acc = accuracy(model, data.test_dataloader())
        seconds = time.perf_counter() - start
        rows.append({"observer": observer, "accuracy": acc, "seconds": round(seconds, 1)})
        print(f"{observer}: W{args.bits}A{args.bits} {acc:.4f} ({seconds:.0f} s)", file=sys.stderr)
    print(f"| observer (W{args.bits}A{args.bits}, calibration only) | test accuracy |")
    print("|---|---:|")
    for row in rows:
        print(f"| {row['observer']} | {row['accuracy']:.4f} |")
    print(json.dumps({"bits": args.bits, "test_samples": len(data.test_set), "rows": rows}))


if __name__ == "__main__":
    main()
