"""Train-step time of QAT against float and against every peer, in one run.

resnet18 at CIFAR size (3x3 stem, no max pool), batch 64. All sides start from one set of float
weights and train on the same cycle of 4 random batches: float; this package (W8A8: per-channel
symmetric int8 weights, affine uint8 activations, BN folded in the QAT way); torch.ao eager QAT
(`prepare_qat` with the default x86 qconfig on torchvision's quantizable resnet18, Conv+BN+ReLU
fused); with ``--peers``, Brevitas, AIMET, NNCF, ModelOpt and torchao as `peer_steps.py` builds
them. Steps are interleaved round by round, so machine noise hits all sides alike; the figures
are medians and ratios over float, with each side's loss after the rounds (the same steps on
the same batches). ``--memory`` adds each side's train-step memory (peak resident memory of
three steps over the memory before them, a child process per side; and, exactly, the tensors
one forward saves for backward besides parameters and buffers). Then the validation
forward (eval mode, no autograd) of float, of our model in fake quant and of our model in
eval's default integer simulation.

``--compile`` times every side under ``torch.compile`` instead (the train steps only).

Usage: python experiments/bench_qat_step.py [--steps 6] [--batch 64] [--device cpu]
       [--clock cpu] [--ops] [--memory] [--compile]
       [--peers brevitas aimet nncf modelopt torchao --peer-dir /work/peers]
Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torchvision
from peer_steps import BUILDERS, SCHEMES, add_peer_paths, build_peers
from timing import cpu_model, round_robin_times
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


def ours(model: nn.Module, x: torch.Tensor) -> nn.Module:
    quantize_model(model, W8A8)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for quantizer in quantizers:
            stack.enter_context(quantizer.compute_encodings())
        model(x)
    for quantizer in quantizers:  # QAT as the callback runs it: observers keep tracking
        quantizer.enable_observer(quantizer.scheme.observer in ("minmax", "moving_minmax"))
    return model


def torch_ao(state: dict) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
    from torchvision.models.quantization import resnet18

    model = cifar_stem(resnet18(num_classes=10, quantize=False))
    model.load_state_dict(state)
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(model, inplace=False)


class TrainSteps:
    """SGD steps over a fixed cycle of batches, the same cycle for every side; keeps the losses."""

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.batches, self.losses = model.train(), batches, []
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> None:
        x, y = self.batches[len(self.losses) % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())


def build_sides(
    args: argparse.Namespace, x: torch.Tensor, log, only: str | None = None
) -> tuple[dict, dict]:
    """The float model, ours, torch.ao and the requested peers, all from one set of weights
    (``only``: just that side, so a memory measurement sees no other model's freed pages)."""
    torch.manual_seed(0)
    base = float_model()
    own = {
        "float": lambda: copy.deepcopy(base),
        "qat_lightning": lambda: ours(copy.deepcopy(base), x),
        "torch_ao": lambda: torch_ao(base.state_dict()),
    }
    models = {name: make() for name, make in own.items() if only in (None, name)}
    peers = [p for p in args.peers if only in (None, p)]
    errors: dict[str, str] = {}
    if peers:
        built, errors = build_peers(base, x, peers, log)
        models.update(built)
    return models, errors


def peak_step_memory(args: argparse.Namespace, side: str) -> dict:
    """Run in a child process: resident memory a side's train steps add (peak minus before)."""
    x, batches = data(args)
    models, errors = build_sides(args, x, lambda m: None, only=side)
    if side not in models:
        return {"error": errors.get(side, "not built")}
    step = TrainSteps(models.pop(side), batches)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        step()
    peak = round((_status_kib("VmHWM") - before) / 1024, 1)
    return {"step_peak_mib": peak, "saved_for_backward_mib": saved_for_backward_mib(step)}


def saved_for_backward_mib(step: TrainSteps) -> float:
    """What one forward keeps for its backward, besides parameters and buffers: the
    activation memory of a step, counted per storage (exact, unlike the resident peak)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, _ = step.batches[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.model(x)
    state = (*step.model.parameters(), *step.model.buffers())
    own = {t.untyped_storage().data_ptr() for t in state}
    return round(sum(n for ptr, n in storages.items() if ptr not in own) / 2**20, 1)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_of_sides(args: argparse.Namespace, sides: list[str], log) -> dict:
    out = {}
    for side in sides:
        log(f"memory: {side} ...")
        cmd = [sys.executable, __file__, "--memory-of", side, "--batch", str(args.batch)]
        if side in BUILDERS:
            cmd += ["--peers", side]
        if args.peer_dir is not None:
            cmd += ["--peer-dir", str(args.peer_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        out[side] = json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-300:]}
    return out


def data(args: argparse.Namespace) -> tuple[torch.Tensor, list]:
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(args.batch, 3, 32, 32, generator=generator),
         torch.randint(0, 10, (args.batch,), generator=generator))
        for _ in range(4)
    ]  # fmt: skip
    return batches[0][0], batches


def op_counts(step: TrainSteps) -> dict[str, int]:
    """ATen ops of one train step (forward, backward, optimizer), by name: the total and the
    elementwise bookkeeping ops around the fake-quant kernels."""
    step.model.train()  # the validation forwards left it in eval mode
    with torch.profiler.profile() as prof:
        step()
    counts = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    shown = ("mul", "div", "copy_", "neg", "where", "isfinite", "item", "to")
    return {"total": sum(counts.values()), **{op: counts[f"aten::{op}"] for op in shown}}


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
    parser.add_argument(
        "--peers",
        nargs="*",
        default=[],
        choices=sorted(BUILDERS),
        help="peers to time beside torch.ao (installed under --peer-dir)",
    )
    parser.add_argument(
        "--peer-dir",
        type=Path,
        default=None,
        help="folder whose subfolders hold the peers' side installs",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each side's train-step memory (a child process each)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; "
        "use it with OMP_NUM_THREADS=1)",
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="also count the ATen ops of one train step per side (torch.profiler)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every side's model (steps only: no validation or memory figures)",
    )
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    add_peer_paths(args.peer_dir)
    if args.memory_of is not None:
        print(json.dumps(peak_step_memory(args, args.memory_of)))
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    device = torch.device(args.device)
    x, batches = data(args)
    models, errors = build_sides(args, x, log)
    models = {name: model.to(device) for name, model in models.items()}
    if args.compile:  # as a user compiling their LightningModule's network would
        models = {name: torch.compile(model) for name, model in models.items()}
    batches = [(bx.to(device), by.to(device)) for bx, by in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    steps = {name: TrainSteps(model, batches) for name, model in models.items()}
    log(f"timing {len(steps)} sides, {args.warmup} + {args.steps} rounds ...")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    step_times = round_robin_times(steps, args.steps, args.warmup, sync, clock)
    median = {k: statistics.median(v) for k, v in step_times.items()}
    x = x.to(device)
    eval_median = {}
    if not args.compile:
        evals = {
            "float": eval_forward(models["float"], x),
            "qat_lightning_fake_quant": eval_forward(models["qat_lightning"], x, fake_quant=True),
            "qat_lightning_integer": eval_forward(models["qat_lightning"], x),
        }
        eval_times = round_robin_times(evals, args.steps, args.warmup, sync, clock)
        eval_median = {k: statistics.median(v) for k, v in eval_times.items()}
    figures = {
        "bench": "qat_step",
        "model": "resnet18-cifar",
        "cpu": cpu_model(),
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "compiled": args.compile,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "min_step_s": {k: round(min(v), 4) for k, v in step_times.items()},
        "ratio_over_float": {
            k: round(v / median["float"], 3) for k, v in median.items() if k != "float"
        },
        "loss_after_steps": {k: round(float(s.losses[-1]), 4) for k, s in steps.items()},
        "steps_trained": args.warmup + args.steps,
        "goal": "qat_lightning <= 1.25x float and below every peer",
        "min_ratio_over_float": {
            k: round(min(v) / min(step_times["float"]), 3)
            for k, v in step_times.items()
            if k != "float"
        },
        "eval_forward_s": {k: round(v, 4) for k, v in eval_median.items()},
        "eval_ratio_over_float": {
            k: round(v / eval_median["float"], 3) for k, v in eval_median.items()
        },
        "goal_compiled": "qat_lightning <= 1.15x a compiled float step" if args.compile else None,
        "peer_errors": errors,
        "schemes": {k: SCHEMES[k] for k in models if k in SCHEMES},
    }
    if args.ops:
        figures["aten_ops_per_step"] = {name: op_counts(step) for name, step in steps.items()}
    if args.memory and not args.compile:
        memory = memory_of_sides(args, list(models), log)
        base = memory["float"].get("step_peak_mib")
        saved = memory["float"].get("saved_for_backward_mib")
        figures["step_memory"] = {
            k: {**v, **({"ratio_over_float": round(v["step_peak_mib"] / base, 3),
                         "saved_ratio_over_float": round(v["saved_for_backward_mib"] / saved, 3)}
                        if base and saved and "step_peak_mib" in v else {})}
            for k, v in memory.items()
        }  # fmt: skip
    print(json.dumps(figures))
    print_table(figures)


def print_table(figures: dict) -> None:
    memory = figures.get("step_memory", {})
    print(
        f"\n{figures['cpu']}, batch {figures['batch']}, {figures['threads']} threads, "
        f"{figures['clock']} clock{', torch.compile' if figures['compiled'] else ''}"
    )
    print(
        "| side | step s median (min) | over float median (min) | loss after {} steps "
        "| step memory over float | saved for backward over float |".format(
            figures["steps_trained"]
        )
    )
    print("|---|---:|---:|---:|---:|---:|")
    for side, seconds in figures["median_step_s"].items():
        ratio = figures["ratio_over_float"].get(side, 1.0)
        min_ratio = figures["min_ratio_over_float"].get(side, 1.0)
        mem = memory.get(side, {}).get("ratio_over_float", "")
        saved = memory.get(side, {}).get("saved_ratio_over_float", "")
        loss = figures["loss_after_steps"][side]
        print(
            f"| {side} | {seconds:.3f} ({figures['min_step_s'][side]:.3f}) "
            f"| {ratio:.3f} ({min_ratio:.3f}) | {loss:.4f} | {mem} | {saved} |"
        )
    for side, error in figures["peer_errors"].items():
        print(f"| {side} | failed: {error} | | | | |")
    if not figures["eval_forward_s"]:
        return
    print("\n| validation forward | median s | over float |\n|---|---:|---:|")
    for side, seconds in figures["eval_forward_s"].items():
        print(f"| {side} | {seconds:.3f} | {figures['eval_ratio_over_float'][side]:.3f} |")
    if "aten_ops_per_step" in figures:
        ops = figures["aten_ops_per_step"]
        names = list(next(iter(ops.values())))
        print("\n| ATen ops in one step | " + " | ".join(ops) + " |")
        print("|---|" + "---:|" * len(ops))
        for name in names:
            print(f"| {name} | " + " | ".join(str(ops[side][name]) for side in ops) + " |")


if __name__ == "__main__":
    main()
