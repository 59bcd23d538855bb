"""Where a transformer's QAT train step spends its time: op counts and top ops, ours vs float.

For a model of `transformer_cases.py` (default: the small ViT, batch 8): the median step of
float and of ours at W8A8 (calibrated, observers tracking), round-robin; then one profiled step
of each (``torch.profiler``, CPU): aten ops per step (nested ones included), fake-quant kernel
calls, and ours' top ops by self CPU time.

Usage: python experiments/profile_qat_step.py [--model vit|bert|...] [--size small|tiny]
       [--rounds 6] [--threads 1]
Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
from bench_transformer import Step, ours
from timing import cpu_model, round_robin
from torch.profiler import ProfilerActivity, profile
from transformer_cases import BUILDERS, case


def profiled(step: Step, top: int) -> dict:
    """Op counts of one step under ``torch.profiler`` and its ``top`` ops by self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    ranked = sorted(aten, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "aten_ops": sum(e.count for e in aten),
        "fake_quant_per_tensor": sum(
            e.count for e in aten if e.key.startswith("aten::_fake_quantize_per_tensor")
        ),
        "fake_quant_per_channel": sum(
            e.count for e in aten if e.key == "aten::fake_quantize_per_channel_affine_cachemask"
        ),
        "top_self_cpu": [
            {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 2)}
            for e in ranked
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit", choices=list(BUILDERS))
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = case(args.model, args.size)
    torch.manual_seed(0)
    base = c.build()
    batches = [c.batch(args.batch, seed) for seed in range(2)]
    steps = {
        "float": Step(c, copy.deepcopy(base), batches[0]),
        "qat_lightning": Step(c, ours(copy.deepcopy(base), batches), batches[0]),
    }
    print(f"{args.model}: timing ...", file=sys.stderr, flush=True)
    median = round_robin(steps, args.rounds, warmup=2)
    figures = {
        "bench": "profile_qat_step",
        "cpu": cpu_model(),
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_over_float": round(median["qat_lightning"] / median["float"], 3),
        "profile": {name: profiled(step, args.top) for name, step in steps.items()},
    }
    print(json.dumps(figures))
    print(f"\n{figures['cpu']}, {args.model} ({args.size}), batch {args.batch}")
    print("| side | step s | aten ops / step | fake quants (per tensor, per channel) |")
    print("|---|---:|---:|---:|")
    for name, p in figures["profile"].items():
        fq = f"{p['fake_quant_per_tensor']}, {p['fake_quant_per_channel']}"
        print(f"| {name} | {median[name]:.4f} | {p['aten_ops']} | {fq} |")
    print(f"ours over float: {figures['ratio_over_float']:.2f}x; ours' top ops by self CPU:")
    for row in figures["profile"]["qat_lightning"]["top_self_cpu"]:
        print(f"  {row['op']}: {row['calls']} calls, {row['self_ms']} ms")


if __name__ == "__main__":
    main()
