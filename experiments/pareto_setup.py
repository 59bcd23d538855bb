"""What experiments/pareto.py runs each (dataset, model) pair on: its plan, data, model, a
`Trainer`, and the measurements (fake-quant or integer top-1, quantized weight bytes).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from qat_lightning import QuantModule
from qat_lightning.app.data import check_data
from qat_lightning.app.datamodule import ImageDataModule
from qat_lightning.app.models import ResNetCifar, SmallCNN
from qat_lightning.nn import fake_quant_eval
from qat_lightning.surgery.modes import kept_modes

START = time.perf_counter()


@dataclass(frozen=True)
class Plan:
    """What one (dataset, model) pair runs; the defaults fit 35 minutes on 2 shared cores."""

    dataset: str
    model: str
    fp32_steps: int
    qat_steps: int
    batch_size: int
    qat_batch_size: int
    lr: float = 2e-3
    qat_lr: float = 1e-4
    calibration_batches: int = 4  # PTQ and sensitivity: of 64 images; QAT: of qat_batch_size
    max_test_samples: int | None = None
    max_train_samples: int | None = None
    channels: tuple[int, ...] = (16, 32, 32)


PLANS = {
    "fashion_mnist-cnn": Plan("fashion_mnist", "cnn", 600, 80, 128, 128),
    "cifar10-resnet20": Plan("cifar10", "resnet20", 250, 30, 128, 64, calibration_batches=2),
    "fashion_mnist-resnet20": Plan(
        "fashion_mnist", "resnet20", 250, 30, 128, 64, calibration_batches=2, max_test_samples=2000
    ),
    "cifar10-cnn": Plan("cifar10", "cnn", 600, 80, 128, 128),
}


SMOKE = {
    "digits-cnn": Plan(
        "digits", "cnn", 80, 3, 64, 64, lr=5e-3, calibration_batches=2, channels=(8, 16)
    ),
}


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


class StepProgress(pl.Callback):
    """A progress line every fifth of a fit's steps (the float phase runs for minutes)."""

    def __init__(self, label: str, steps: int) -> None:
        self.label, self.steps, self.every = label, steps, max(1, steps // 5)

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, *_: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            progress(f"{self.label}: step {step}/{self.steps}, train loss {loss:.3f}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_module(plan: Plan, root: str | None, seed: int) -> ImageDataModule:
    node = OmegaConf.create(
        {
            "name": plan.dataset,
            "root": root or ".",
            "batch_size": plan.batch_size,
            "eval_batch_size": 256,
            "val_fraction": 0.1,
            "test_fraction": 0.2,
            "seed": seed,
            "max_train_samples": plan.max_train_samples,
            "max_test_samples": plan.max_test_samples,
            "num_workers": 0,
            "augment": False,
        }
    )
    problem = check_data(node)
    if problem is not None:
        flag = "--fashion-root " if plan.dataset == "fashion_mnist" else "--cifar-root "
        problem = problem.replace("data.root=", flag).split(" (nothing is downloaded")[0]
        raise SystemExit(f"pareto.py: {problem} (nothing is downloaded)")
    data = ImageDataModule(node)
    data.setup()
    return data


def build(plan: Plan, data: ImageDataModule) -> nn.Module:
    info = data.info
    if plan.model == "cnn":
        return SmallCNN(info.in_channels, info.num_classes, list(plan.channels))
    return ResNetCifar(info.in_channels, info.num_classes)


def optim(lr: float) -> Any:
    return OmegaConf.create(
        {"name": "adam", "lr": lr, "weight_decay": 0.0, "momentum": 0.9, "scheduler": "none"}
    )


def trainer(steps: int, callbacks: list, root: Path) -> pl.Trainer:
    """No logger, checkpoint or validation; ``root`` takes what the callback writes there
    (its ``qat_report.txt``)."""
    return pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )


def loader(data: ImageDataModule, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        data.train_set,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def top1(model: nn.Module, batches: Any, integer: bool = False) -> tuple[float, torch.Tensor]:
    """Top-1 and the predictions; fake quantization unless ``integer`` (the export's
    integer simulation, what a quantized model's eval mode runs). In eval mode; every
    submodule has its own mode back afterwards (QAT starts from this model)."""
    predictions, labels = [], []
    with kept_modes(model):
        for x, y in batches:
            if integer:
                predictions.append(model(x).argmax(1))
            else:
                with fake_quant_eval():
                    predictions.append(model(x).argmax(1))
            labels.append(y)
    p, y = torch.cat(predictions), torch.cat(labels)
    return float((p == y).float().mean()), p


def weight_bytes(model: nn.Module) -> tuple[float, dict[str, int]]:
    """The quantized weights' size as the model holds them, and each layer's weight bits."""
    bits, size = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            for param, quantizer in module.param_quantizers.items():
                tensor = getattr(module, param, None)
                if quantizer is not None and tensor is not None:
                    bits[name] = quantizer.scheme.bits
                    size += tensor.numel() * quantizer.scheme.bits
    return size / 8, bits
