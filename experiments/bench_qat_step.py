"""Train-step time of QAT against float and against torch.ao eager QAT, in one run.

resnet18 at CIFAR size (3x3 stem, no max pool), batch 64. Three models train side by side:
float; this package (W8A8: per-channel symmetric int8 weights, affine uint8 activations, BN
folded in the QAT way); torch.ao eager QAT (`prepare_qat` with the default x86 qconfig on
torchvision's quantizable resnet18, Conv+BN+ReLU fused). Steps are interleaved round by round,
so machine noise hits all three alike; the figures are medians and ratios over float. Then
the validation forward (eval mode, no autograd) of float, of our model in fake quant and of our
model in eval's default integer simulation.

Usage: python experiments/bench_qat_step.py [--steps 6] [--batch 64] [--device cpu]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torchvision
from timing import round_robin
from torch import nn

from qat_lightning.nn import fake_quant_eval
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import quantize_model

W8A8 = {
    "inputs": {"bits": 8, "symmetric": False, "signed": False, "observer": "moving_minmax"},
    "params": {"bits": 8, "granularity": "per_channel"},
}


def cifar_stem(model: nn.Module) -> nn.Module:
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def float_model() -> nn.Module:
    return cifar_stem(torchvision.models.resnet18(num_classes=10))


def ours(x: torch.Tensor) -> nn.Module:
    model = float_model()
    quantize_model(model, W8A8)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for quantizer in quantizers:
            stack.enter_context(quantizer.compute_encodings())
        model(x)
    for quantizer in quantizers:  # QAT as the callback runs it: observers keep tracking
        quantizer.enable_observer(quantizer.scheme.observer in ("minmax", "moving_minmax"))
    return model


def torch_ao() -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
    from torchvision.models.quantization import resnet18

    model = cifar_stem(resnet18(num_classes=10, quantize=False))
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(model, inplace=False)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def eval_forward(model: nn.Module, x: torch.Tensor, fake_quant: bool = False):
    """A validation forward (eval mode, no autograd): our QAT model runs the integer
    simulation there unless ``fake_quant`` (`fake_quant_eval`, the training arithmetic)."""
    model.eval()

    def forward() -> None:
        with torch.no_grad(), fake_quant_eval() if fake_quant else contextlib.nullcontext():
            model(x)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    models = {
        "float": float_model().to(device),
        "qat_lightning": ours(x.cpu()).to(device),
        "torch_ao": torch_ao().to(device),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    steps = {name: train_step(model, x, y) for name, model in models.items()}
    median = round_robin(steps, args.steps, args.warmup, sync)
    evals = {
        "float": eval_forward(models["float"], x),
        "qat_lightning_fake_quant": eval_forward(models["qat_lightning"], x, fake_quant=True),
        "qat_lightning_integer": eval_forward(models["qat_lightning"], x),
    }
    eval_median = round_robin(evals, args.steps, args.warmup, sync)
    print(
        json.dumps(
            {
                "bench": "qat_step",
                "model": "resnet18-cifar",
                "batch": args.batch,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "median_step_s": {k: round(v, 4) for k, v in median.items()},
                "ratio_over_float": {
                    "qat_lightning": round(median["qat_lightning"] / median["float"], 3),
                    "torch_ao": round(median["torch_ao"] / median["float"], 3),
                },
                "goal": "qat_lightning <= 1.3x float and below torch_ao",
                "eval_forward_s": {k: round(v, 4) for k, v in eval_median.items()},
                "eval_ratio_over_float": {
                    k: round(v / eval_median["float"], 3) for k, v in eval_median.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
