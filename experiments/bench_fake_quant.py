"""Fake-quant speed: qat_lightning's `Quantizer` against torch.ao's fake quantizers.

Forward + backward of one 8-bit fake quantization, in two modes:

- ``fixed``: encodings frozen, observer off (QAT after observer freeze; the common case);
- ``observe``: a moving min/max observer updates the encodings on every step (early QAT).

Each case runs on an activation-like ``(64, 256, 56, 56)`` tensor and a ``(4096, 4096)`` weight,
per-tensor (affine uint8, as an activation) and per-channel along axis 0 (symmetric int8, as a
weight). The peers run in the same process, interleaved repeat by repeat so that load from
anything else on the machine hits all of them alike; the figure is the median.

Peers: ``torch.ao.quantization.FakeQuantize`` (observer module + fused fake-quant kernel) and
``FusedMovingAvgObsFakeQuantize`` (observer and fake quant in one ATen op). ``ratio`` is
ours / FakeQuantize, ``ratio_fused`` ours / FusedMovingAvgObsFakeQuantize.

Usage::

    python experiments/bench_fake_quant.py            # full size
    python experiments/bench_fake_quant.py --quick    # small tensors, a smoke run

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)

from qat_lightning.quant import Quantizer, QuantScheme

FULL_SHAPES = {"activation": (64, 256, 56, 56), "weight": (4096, 4096)}
QUICK_SHAPES = {"activation": (8, 32, 28, 28), "weight": (512, 512)}


def ours(granularity: str, observe: bool, x: torch.Tensor) -> nn.Module:
    """A calibrated `Quantizer`; its observer stays on in ``observe`` mode."""
    if granularity == "per_tensor":
        scheme = QuantScheme(bits=8, symmetric=False, signed=False, observer="moving_minmax")
    else:
        scheme = QuantScheme(granularity="per_channel", axis=0, observer="moving_minmax")
    quantizer = Quantizer(scheme).to(x.device)
    with quantizer.compute_encodings():
        quantizer(x)
    return quantizer.enable_observer(observe)


def torch_ao(granularity: str, observe: bool, x: torch.Tensor, *, fused: bool) -> nn.Module:
    """The torch.ao equivalent, calibrated on the same tensor."""
    cls = FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    if granularity == "per_tensor":
        fq = cls(
            observer=MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
    else:
        fq = cls(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
    fq = fq.to(x.device)
    fq(x)  # the first call calibrates
    if not observe:
        fq.disable_observer()
    return fq


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, clock=time.perf_counter
) -> float:
    """Seconds for one forward + backward."""
    x.grad = None
    _sync(x.device)
    start = clock()
    module(x).backward(grad)
    _sync(x.device)
    return clock() - start


def run_case(
    impls: dict[str, Callable[[torch.Tensor], nn.Module]],
    x: torch.Tensor,
    repeats: int,
    warmup: int,
    clock=time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per implementation, the implementations interleaved."""
    grad = torch.randn_like(x)
    modules = {name: make(x.detach()) for name, make in impls.items()}
    times: dict[str, list[float]] = {name: [] for name in modules}
    for step in range(warmup + repeats):
        for name, module in modules.items():
            elapsed = time_step(module, x, grad, clock)
            if step >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tensors (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    torch.manual_seed(0)

    cases = {}
    for tensor_name, shape in shapes.items():
        x = torch.randn(shape, device=device).requires_grad_()
        for granularity in ("per_tensor", "per_channel"):
            for observe in (False, True):
                impls = {
                    "ours": partial(ours, granularity, observe),
                    "ao_fakequant": partial(torch_ao, granularity, observe, fused=False),
                    "ao_fused": partial(torch_ao, granularity, observe, fused=True),
                }
                ms = run_case(impls, x, repeats, 1 if args.quick else 2, clock)
                name = f"{tensor_name}/{granularity}/{'observe' if observe else 'fixed'}"
                cases[name] = {
                    **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                    "ratio": round(ms["ours"] / ms["ao_fakequant"], 3),
                    "ratio_fused": round(ms["ours"] / ms["ao_fused"], 3),
                }
        del x

    result = {
        "benchmark": "fake_quant_fwd_bwd",
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu {platform.machine()} x{os.cpu_count()}"
        ),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "quick": args.quick,
        "repeats": repeats,
        "shapes": {k: list(v) for k, v in shapes.items()},
        "cases": cases,
        "max_ratio": max(c["ratio"] for c in cases.values()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
