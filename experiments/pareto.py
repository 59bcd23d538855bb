"""Issue 16: accuracy against weight size, uniform W2/W3/W4/W8 against mixed precision.

Per (dataset, model): train the float model once (a fixed number of steps), then for each
uniform weight width ``b`` in 2, 3, 4, 8 and for mixed precision at the same weight size
(`qat_lightning.analysis.mixed_precision` with the uniform config's bytes as the budget, on a
`sensitivity` of the float model), measure the test top-1 of

- PTQ: `qat_lightning.calibrate` on fixed training batches, no training step;
- QAT: the same float weights fine-tuned for a fixed number of steps with `QATCallback` on a
  Lightning `Trainer`.

Activations are 8-bit everywhere (the package default: affine unsigned, moving min/max);
weights are symmetric per-channel min/max. Sizes count the quantized layers' weights
(``numel * bits / 8``, as `mixed_precision` does; biases and activations are not counted).
A mixed budget that only one choice meets (every layer at 2 bits, or every layer at 8) is the
uniform config itself: it is reported as such, not trained twice. Accuracies are measured with
fake quantization (`fake_quant_eval`, the arithmetic QAT trains with); one point per pair is
also measured with the integer simulation the export runs, and their top-1 agreement reported.

Usage:
    python experiments/pareto.py --fashion-root /work/shared/data \
        --cifar-root /work/shared/data/cifar10-partial [--out outputs/pareto]
    python experiments/pareto.py --smoke           # scikit-learn digits, seconds
Progress goes to stderr; a table, then one JSON line, to stdout; ``<out>/results.json`` and one
PNG per pair under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import multiprocessing
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from qat_lightning import QATCallback, calibrate
from qat_lightning.analysis import mixed_precision, sensitivity
from qat_lightning.app.module import Classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pareto_report import WIDTHS, compare, plot, table
from pareto_setup import (
    PLANS,
    SMOKE,
    START,
    Plan,
    StepProgress,
    build,
    cpu_model,
    data_module,
    loader,
    optim,
    progress,
    top1,
    trainer,
    weight_bytes,
)

QUIET = (
    r".*(does not have many workers|LeafSpec|module\(s\) in eval mode|smaller than the "
    r"logging|no `val_dataloader`).*"
)


def point(
    pair: str,
    kind: str,
    mode: str,
    width: int,
    model: nn.Module,
    claimed: float,
    test: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    size, bits = weight_bytes(model)
    if abs(size - claimed) > 1e-6:
        raise RuntimeError(
            f"{pair} {kind} W{width} {mode}: the model holds {size} bytes of "
            f"weights, the plan says {claimed}; the overrides did not apply"
        )
    accuracy, _ = top1(model, test)
    progress(f"{pair}: {kind} at W{width} size, {mode}: top-1 {accuracy:.4f}, {size:.0f} bytes")
    return {
        "pair": pair,
        "kind": kind,
        "mode": mode,
        "width": width,
        "size_bytes": size,
        "accuracy": accuracy,
        "bits": sorted(set(bits.values())),
        **extra,
    }


def run_pair(pair: str, plan: Plan, root: str | None, out: Path, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    data = data_module(plan, root, seed)
    test = list(data.test_dataloader())
    calib_loader = loader(data, 64, seed)
    calib = [x for (x, _), _ in zip(calib_loader, range(plan.calibration_batches), strict=False)]

    float_model = build(plan, data)
    key = hashlib.sha256(json.dumps(asdict(plan), sort_keys=True).encode()).hexdigest()[:10]
    cache = out / pair / f"fp32-{key}-{seed}.pt"
    started = time.perf_counter()
    if cache.is_file():
        float_model.load_state_dict(torch.load(cache, weights_only=True))
        progress(f"{pair}: float model loaded from {cache}")
    else:
        progress(f"{pair}: float training, {plan.fp32_steps} steps of {plan.batch_size}")
        module = Classifier(float_model, optim(plan.lr), num_classes=data.info.num_classes)
        steps = StepProgress(f"{pair}: float training", plan.fp32_steps)
        trainer(plan.fp32_steps, [steps], out / pair).fit(
            module, loader(data, plan.batch_size, seed)
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(float_model.state_dict(), cache)
    fp32_seconds = time.perf_counter() - started
    fp32_accuracy, _ = top1(float_model, test)
    progress(f"{pair}: float top-1 {fp32_accuracy:.4f} ({fp32_seconds:.0f} s)")

    base = QATCallback(params={"bits": 8}).config  # the schemes every point uses
    result = sensitivity(float_model, calib, None, bits=WIDTHS, which=("params",), config=base)
    progress(f"{pair}: sensitivity of {len(result.layers)} layers at {WIDTHS} bits done")
    numel = sum(result.weight_numel.values())

    points = []
    for width in WIDTHS:
        budget = numel * width / 8
        choice = mixed_precision(result, budget)
        same = set(choice.bits.values()) == {width}
        configs = [("uniform", {}, {})]
        if not same:
            configs.append(
                (
                    "mixed",
                    choice.bits,
                    {"chosen_bits": choice.bits, "sensitivity_cost": choice.cost},
                )
            )
        for kind, per_layer, extra in configs:
            claimed = budget if kind == "uniform" else choice.size_bytes
            overrides = {n: {"params": {"bits": b}} for n, b in per_layer.items()}
            ptq_model = copy.deepcopy(float_model)
            config = QATCallback(params={"bits": width}, overrides=overrides).config
            calibrate(ptq_model, calib, config)
            points.append(point(pair, kind, "ptq", width, ptq_model, claimed, test, extra))

            module = Classifier(
                copy.deepcopy(float_model), optim(plan.qat_lr), num_classes=data.info.num_classes
            )
            callback = QATCallback(
                params={"bits": width},
                overrides={f"model.{n}": o for n, o in overrides.items()},
                calibration_batches=plan.calibration_batches,
                export_formats=(),
            )
            trainer(plan.qat_steps, [callback], out / pair).fit(
                module, loader(data, plan.qat_batch_size, seed + width)
            )
            points.append(point(pair, kind, "qat", width, module.model, claimed, test, extra))
            if kind == "mixed" and width == 4:  # the integer simulation, on one point
                head = test[:2]  # 512 images: the integer simulation is slow on CPU
                fq_accuracy, fq = top1(module.model, head)
                int_accuracy, integer = top1(module.model, head, integer=True)
                points[-1]["integer_check"] = {
                    "images": len(fq),
                    "fake_quant_accuracy": fq_accuracy,
                    "integer_accuracy": int_accuracy,
                    "top1_agreement": float((fq == integer).float().mean()),
                }
                progress(
                    f"{pair}: integer simulation agrees on "
                    f"{points[-1]['integer_check']['top1_agreement']:.4f} of top-1"
                )
        if same:
            for mode in ("ptq", "qat"):
                uniform = next(
                    p
                    for p in points
                    if (p["kind"], p["mode"], p["width"]) == ("uniform", mode, width)
                )
                points.append(
                    {
                        **uniform,
                        "kind": "mixed",
                        "same_as_uniform": True,
                        "chosen_bits": choice.bits,
                    }
                )
    return {
        "pair": pair,
        "plan": asdict(plan),
        "fp32_accuracy": fp32_accuracy,
        "fp32_weight_bytes": 4 * numel,
        "fp32_train_seconds": fp32_seconds,
        "test_samples": sum(len(y) for _, y in test),
        "train_samples": len(data.train_set),
        "layers": len(result.layers),
        "sensitivity": result.to_dict(),
        "points": points,
        "comparison": compare(points),
    }


def _worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=QUIET)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fashion-root", help="directory holding FashionMNIST/raw/")
    parser.add_argument("--cifar-root", help="directory holding cifar-10-batches-py/")
    parser.add_argument(
        "--pairs",
        nargs="+",
        choices=sorted(PLANS),
        default=["fashion_mnist-cnn", "cifar10-resnet20"],
    )
    parser.add_argument("--out", default="outputs/pareto", help="plots and results.json")
    parser.add_argument("--smoke", action="store_true", help="scikit-learn digits, seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="pairs run in parallel processes")
    parser.add_argument("--fp32-steps", type=int, help="instead of each plan's")
    parser.add_argument("--qat-steps", type=int, help="instead of each plan's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the callback's per-run surgery table and Lightning's banners: not what this prints
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    plans = SMOKE if args.smoke else {name: PLANS[name] for name in args.pairs}
    changes = {
        k: v
        for k, v in (("fp32_steps", args.fp32_steps), ("qat_steps", args.qat_steps))
        if v is not None
    }
    plans = {name: replace(plan, **changes) for name, plan in plans.items()}
    roots = {"fashion_mnist": args.fashion_root, "cifar10": args.cifar_root, "digits": None}
    for name, plan in plans.items():
        if plan.dataset != "digits" and roots[plan.dataset] is None:
            flag = "--fashion-root" if plan.dataset == "fashion_mnist" else "--cifar-root"
            parser.error(f"{name} needs {flag} DIR (nothing is downloaded)")
    out = Path(args.out)
    print(f"CPU: {cpu_model()}, {args.threads} torch threads; torch {torch.__version__}")
    results = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        jobs = [(name, plan, roots[plan.dataset], out, args.seed) for name, plan in plans.items()]
        if args.jobs > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(args.jobs, len(jobs)), _worker, (args.threads,)) as pool:
                results = pool.starmap(run_pair, jobs)
        else:
            results = [run_pair(*job) for job in jobs]
        for pair in results:
            pair["plot"] = str(plot(pair, out / f"{pair['pair']}.png"))
    summary = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "smoke": args.smoke,
        "seconds": time.perf_counter() - START,
        "pairs": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(table(results))
    slim = {
        **summary,
        "pairs": [{k: v for k, v in p.items() if k != "sensitivity"} for p in results],
    }
    print(json.dumps(slim))
    return summary


if __name__ == "__main__":
    main()
