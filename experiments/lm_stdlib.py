"""Issue 14's experiment: int4 QAT of a byte-level GPT-2 on the standard library's own source.

One process, one seed, one corpus (`lm_data.StdlibCorpus`: the running interpreter's stdlib
``.py`` files as bytes, split by file) and one model (`lm_models.ByteGPT`: Hugging Face
``GPT2LMHeadModel``, tiny config, random init, vocabulary 256, Linear projections):

1. **fp32**: AdamW, cosine schedule with warmup, ``--fp32-steps``; val/test perplexity.
2. **PTQ** from the fp32 weights with `qat_lightning.calibrate` (no training): ``w4_g32``
   (weight-only int4, symmetric, groups of 32, round to nearest) and ``8da4w`` (the same
   weights, int8 affine per-token dynamic activations into every Linear).
3. **QAT (ours)**: each scheme fine-tuned from fp32 with `QATCallback` for ``--qat-steps``.
   The control: the fp32 model trained as many more steps at the same learning rate,
   unquantized (``fp32_continued``), so what QAT gains by training longer shows.
4. **QAT (torchao 0.18)**: ``QATConfig(activation_config=..., weight_config=...,
   step="prepare")`` with ``IntxFakeQuantizeConfig(torch.int4, group_size=32)`` (and int8
   asymmetric per-token activations for 8da4w) on the same model, data order, steps, seed and
   learning rate. torchao comes from the environment (the dev extra) or from ``--peer-dir``
   (``pip install --target .peers torchao==0.18.* --no-deps``, put on ``sys.path`` only here);
   if it does not import or run, the result says why. Its perplexity is that of its
   fake-quantized model (the QAT "prepare" model).
5. **ONNX**: the w4_g32 QAT model, `convert`-ed and exported (``MatMulNBits``), in onnxruntime:
   test perplexity (against the converted model's), ms per token of one ``--timing-length``
   sequence (full forward, no cache) against the fp32 model in onnxruntime and in eager torch
   (rounds interleaved), file sizes.

Ours and torchao quantize the same layers: every Linear (attention and MLP projections, LM
head); embeddings and LayerNorms stay float. Our perplexities are measured in eval mode, which
for a QAT model is its integer simulation (= `convert`).

Run: ``python experiments/lm_stdlib.py --out /tmp/lm`` (``--smoke``: a few hundred bytes, a
tiny model, a few steps). Progress lines go to stderr; ``<out>/results.json``, a JSON line and
a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from lm_data import StdlibCorpus
from lm_models import SKIP, ByteGPT, LMModule, fit, perplexity
from timing import cpu_model, round_robin

from qat_lightning import QATCallback, QuantModule, calibrate, convert, export_onnx
from qat_lightning.export import OnnxModel

W4_G32 = {"bits": 4, "granularity": "per_group", "group_size": 32}
INT8_DYNAMIC = {"bits": 8, "dynamic": True, "granularity": "per_token"}
SCHEMES = {"w4_g32": (None, W4_G32), "8da4w": (INT8_DYNAMIC, W4_G32)}
DEFAULT_PEERS = Path(__file__).resolve().parents[1] / ".peers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results.json and the ONNX files")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128, help="bytes per training window")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fp32-steps", type=int, default=1500)
    p.add_argument("--qat-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3, help="fp32 peak learning rate")
    p.add_argument("--qat-lr", type=float, default=2e-4, help="QAT learning rate (both sides)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=128, help="val and test windows each")
    p.add_argument("--max-bytes", type=int, default=None, help="cut each split (smoke runs)")
    p.add_argument("--timing-length", type=int, default=256)
    p.add_argument("--timing-runs", type=int, default=20)
    p.add_argument(
        "--threads", type=int, default=1, help="torch and onnxruntime threads (1 on shared cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-dir", type=Path, default=DEFAULT_PEERS, help="where torchao is")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the CI smoke test")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.heads, args.context, args.batch = 1, 32, 2, 16, 4
        args.fp32_steps, args.qat_steps, args.calibration_batches = 6, 3, 2
        args.eval_windows, args.timing_length, args.timing_runs = 8, 32, 2
        args.max_bytes = args.max_bytes or 600
    return args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Experiment:
    """The shared pieces of every phase: corpus, fp32 weights, a fresh module of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.corpus = StdlibCorpus(
            args.context, args.batch, args.eval_windows, args.max_bytes, args.seed
        )
        self.fp32_state: dict[str, torch.Tensor] | None = None

    def module(self, lr: float, steps: int, warmup: int = 0) -> LMModule:
        a = self.args
        torch.manual_seed(a.seed)
        model = ByteGPT(a.layers, a.width, a.heads, max(a.context, a.timing_length))
        module = LMModule(model, lr, steps, warmup)
        if self.fp32_state is not None:
            module.load_state_dict(self.fp32_state)
        return module

    def evaluate(self, model) -> dict[str, float]:
        return {
            split: perplexity(model, self.corpus.eval_loader(split)) for split in ("val", "test")
        }

    def calibration_batches(self) -> list[torch.Tensor]:
        loader = self.corpus.train_loader()
        return [x for x, _ in islice(loader, self.args.calibration_batches)]


def run_fp32(exp: Experiment) -> tuple[LMModule, dict]:
    a = exp.args
    module = exp.module(a.lr, a.fp32_steps, warmup=max(1, a.fp32_steps // 20))
    start = time.perf_counter()
    fit(module, exp.corpus.train_loader(), a.fp32_steps, "fp32", seed=a.seed, root=a.out)
    exp.fp32_state = copy.deepcopy(module.state_dict())
    return module, {"train_s": time.perf_counter() - start, **exp.evaluate(module)}


def run_fp32_continued(exp: Experiment) -> dict:
    """The control: the fp32 model trained ``--qat-steps`` more at the QAT learning rate, no
    quantization (what QAT's extra steps alone are worth)."""
    a = exp.args
    module = exp.module(a.qat_lr, a.qat_steps)
    start = time.perf_counter()
    fit(module, exp.corpus.train_loader(), a.qat_steps, "fp32 continued", seed=a.seed, root=a.out)
    return {"train_s": time.perf_counter() - start, **exp.evaluate(module)}


def quantized_linears(model: torch.nn.Module) -> int:
    return sum(
        isinstance(m, QuantModule) and isinstance(m, torch.nn.Linear) for m in model.modules()
    )


def run_ptq(exp: Experiment, inputs, params) -> dict:
    module = exp.module(exp.args.qat_lr, exp.args.qat_steps)
    calibrate(module, exp.calibration_batches(), inputs=inputs, params=params, skip=list(SKIP))
    return {"quantized_linears": quantized_linears(module), **exp.evaluate(module)}


def run_qat_ours(exp: Experiment, name: str, inputs, params) -> tuple[LMModule, dict]:
    a = exp.args
    module = exp.module(a.qat_lr, a.qat_steps)
    callback = QATCallback(
        inputs=inputs,
        params=params,
        skip=list(SKIP),
        calibration_batches=a.calibration_batches,
        export_dir=a.out / f"qat_{name}",
        export_formats=(),
    )
    start = time.perf_counter()
    fit(
        module,
        exp.corpus.train_loader(),
        a.qat_steps,
        f"qat ours {name}",
        [callback],
        a.seed,
        a.out,
    )
    train_s = time.perf_counter() - start
    count = quantized_linears(module)
    return module, {"train_s": train_s, "quantized_linears": count, **exp.evaluate(module)}


def torchao_in_environment() -> bool:
    """torchao is importable without ``--peer-dir`` (the dev extra installs it)."""
    return importlib.util.find_spec("torchao") is not None


def torchao_available(peer_dir: Path) -> bool:
    """torchao will run: installed, or in ``peer_dir``."""
    return torchao_in_environment() or (peer_dir / "torchao").is_dir()


def run_qat_torchao(exp: Experiment, name: str, inputs) -> dict:
    """torchao's QAT of the same model, or ``{"skipped": why}``."""
    a = exp.args
    side = not torchao_in_environment()
    if side and not (a.peer_dir / "torchao").is_dir():
        return {
            "skipped": f"torchao is neither installed (the dev extra installs it) nor in "
            f"--peer-dir {a.peer_dir}"
        }
    if side:
        sys.path.insert(0, str(a.peer_dir))
    try:
        import torchao
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except Exception as error:
        return {"skipped": f"torchao does not import: {type(error).__name__}: {error}"}
    finally:
        if side:
            sys.path.remove(str(a.peer_dir))
    try:
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
        activation = None
        if inputs is not None:
            activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        module = exp.module(a.qat_lr, a.qat_steps)
        config = QATConfig(activation_config=activation, weight_config=weight, step="prepare")
        quantize_(module.model, config)  # every nn.Linear; the embeddings stay float
        start = time.perf_counter()
        fit(
            module,
            exp.corpus.train_loader(),
            a.qat_steps,
            f"qat torchao {name}",
            seed=a.seed,
            root=a.out,
        )
        train_s = time.perf_counter() - start
        return {"version": torchao.__version__, "train_s": train_s, **exp.evaluate(module)}
    except Exception as error:
        return {"skipped": f"torchao {torchao.__version__} fails: {type(error).__name__}: {error}"}


def file_bytes(path: Path) -> int:
    """The ONNX file and its external data files, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def run_onnx(exp: Experiment, qat_w4: LMModule, fp32: LMModule) -> dict:
    a = exp.args
    test = exp.corpus.eval_loader("test")
    converted = convert(qat_w4.model).eval()
    example = next(iter(test))[0][:2]  # batch 2: torch.export specializes a 1
    int4_path = export_onnx(converted, example, a.out / "lm_w4_g32.onnx")
    float_model = copy.deepcopy(fp32.model).eval()
    fp32_path = a.out / "lm_fp32.onnx"
    torch.onnx.export(
        float_model,
        (example,),
        str(fp32_path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}},
        dynamo=True,
    )
    int4_ort = OnnxModel(int4_path, threads=a.threads)
    fp32_ort = OnnxModel(fp32_path, threads=a.threads)
    result = {
        "converted_test": perplexity(converted, test),
        "onnx_test": perplexity(int4_ort, test),
        "fp32_onnx_test": perplexity(fp32_ort, test),
    }
    ids = torch.randint(0, 256, (1, a.timing_length), generator=torch.Generator().manual_seed(0))

    def eager() -> None:
        with torch.no_grad():
            float_model(ids)

    seconds = round_robin(
        {
            "fp32_eager": eager,
            "fp32_onnx": lambda: fp32_ort(ids),
            "w4_g32_onnx": lambda: int4_ort(ids),
        },
        runs=a.timing_runs,
        warmup=2,
    )
    result["ms_per_token"] = {k: 1e3 * v / a.timing_length for k, v in seconds.items()}
    result["bytes"] = {"fp32_onnx": file_bytes(fp32_path), "w4_g32_onnx": file_bytes(int4_path)}
    return result


def recovery(ppl_fp32: float, ppl_ptq: float, ppl_qat: float) -> float | None:
    """The share of PTQ's perplexity increase that QAT recovers, ``(ppl_ptq - ppl_qat) /
    (ppl_ptq - ppl_fp32)`` (None where PTQ loses nothing). With ``ppl_fp32`` the control's
    (fp32 trained as many more steps), it is ``1 - (ppl_qat - ppl_control) / (ppl_ptq -
    ppl_fp32)`` instead: the share of the quantization penalty that is gone after QAT."""
    gap = ppl_ptq - ppl_fp32
    return (ppl_ptq - ppl_qat) / gap if gap > 0 else None


def recovery_controlled(
    ppl_fp32: float, ppl_ptq: float, ppl_control: float, ppl_qat: float
) -> float | None:
    """``1 - (ppl_qat - ppl_control) / (ppl_ptq - ppl_fp32)``: how much of PTQ's penalty
    is gone after QAT, against a float model trained as long (None where PTQ loses
    nothing)."""
    gap = ppl_ptq - ppl_fp32
    return 1 - (ppl_qat - ppl_control) / gap if gap > 0 else None


def table(results: dict) -> str:
    fp32 = results["fp32"]["test"]
    control = results["fp32_continued"]["test"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"

    rows = [
        f"CPU: {results['cpu']}; test perplexity; recovered = (PTQ - QAT) / (PTQ - fp32), "
        f"controlled = 1 - (QAT - fp32 continued) / (PTQ - fp32); fp32 continued "
        f"{control:.3f}",
        "",
        "| scheme | fp32 | PTQ | QAT ours | QAT torchao | recovered ours | recovered torchao "
        "| controlled ours | controlled torchao |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["schemes"].items():
        ao = r["qat_torchao"].get("test", math.nan)
        rows.append(
            f"| {name} | {fp32:.3f} | {r['ptq']['test']:.3f} | {r['qat_ours']['test']:.3f} | "
            f"{ao:.3f} | {pct(r['recovered_ours'])} | {pct(r.get('recovered_torchao'))} | "
            f"{pct(r['controlled_ours'])} | {pct(r.get('controlled_torchao'))} |"
        )
    o = results["onnx"]
    ms = o["ms_per_token"]
    rows += [
        "",
        "| w4_g32 QAT model | test ppl | ms/token | bytes |",
        "|---|---:|---:|---:|",
        f"| converted (torch) | {o['converted_test']:.4f} | | |",
        f"| ONNX MatMulNBits (onnxruntime) | {o['onnx_test']:.4f} | {ms['w4_g32_onnx']:.3f} | "
        f"{o['bytes']['w4_g32_onnx']} |",
        f"| fp32 ONNX (onnxruntime) | {o['fp32_onnx_test']:.4f} | {ms['fp32_onnx']:.3f} | "
        f"{o['bytes']['fp32_onnx']} |",
        f"| fp32 eager | {fp32:.4f} | {ms['fp32_eager']:.3f} | |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exp = Experiment(args)
    sizes = {k: v for k, v in vars(args).items() if k not in ("out", "peer_dir")}
    results: dict = {"cpu": cpu_model(), "torch": torch.__version__, "args": sizes}
    results["corpus_bytes"] = exp.corpus.sizes()
    log(f"corpus bytes {results['corpus_bytes']}; cpu {results['cpu']}")
    fp32, results["fp32"] = run_fp32(exp)
    log(f"fp32 {results['fp32']}")
    results["fp32_continued"] = run_fp32_continued(exp)
    log(f"fp32 continued {results['fp32_continued']}")
    results["schemes"], qat_w4 = {}, None
    for name, (inputs, params) in SCHEMES.items():
        r = {"ptq": run_ptq(exp, inputs, params)}
        log(f"ptq {name} {r['ptq']}")
        module, r["qat_ours"] = run_qat_ours(exp, name, inputs, params)
        qat_w4 = module if name == "w4_g32" else qat_w4
        log(f"qat ours {name} {r['qat_ours']}")
        r["qat_torchao"] = run_qat_torchao(exp, name, inputs)
        log(f"qat torchao {name} {r['qat_torchao']}")
        base, ptq = results["fp32"]["test"], r["ptq"]["test"]
        control = results["fp32_continued"]["test"]
        for side in ("ours", "torchao"):
            if "test" in r[f"qat_{side}"]:
                qat = r[f"qat_{side}"]["test"]
                r[f"recovered_{side}"] = recovery(base, ptq, qat)
                r[f"controlled_{side}"] = recovery_controlled(base, ptq, control, qat)
        results["schemes"][name] = r
    results["onnx"] = run_onnx(exp, qat_w4, fp32)
    log(f"onnx {results['onnx']}")
    results["wall_s"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
