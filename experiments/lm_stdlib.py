"""Issue 14's experiment: int4 QAT of a byte-level GPT-2 on the standard library's own source.

One process, one seed, one corpus (`lm_data.StdlibCorpus`: the running interpreter's stdlib
``.py`` files as bytes, split by file) and one model (`lm_models.ByteGPT`: Hugging Face
``GPT2LMHeadModel``, tiny config, random init, vocabulary 256, Linear projections).
Three schemes (`SCHEMES`, each a `Scheme`): ``w4_g32`` (weight-only int4, symmetric, groups of
32, round to nearest, on every Linear), ``8da4w`` (the same weights, int8 affine per-token
dynamic activations into every Linear) and ``w4_g32_emb`` (``w4_g32`` on every Linear and on
the token and position embeddings ``wte`` / ``wpe``, grouped along the embedding dimension).

1. **fp32**: AdamW, cosine schedule with warmup, ``--fp32-steps``; val/test perplexity.
2. **PTQ** of each scheme from the fp32 weights with `qat_lightning.calibrate` (no training).
3. **QAT (ours)**: each scheme fine-tuned from fp32 with `QATCallback` for ``--qat-steps``.
   The control: the fp32 model trained as many more steps at the same learning rate,
   unquantized (``fp32_continued``), so what QAT gains by training longer shows.
4. **QAT (torchao 0.18)**, in `lm_torchao.py`: ``QATConfig(activation_config=...,
   weight_config=..., step="prepare")`` with ``IntxFakeQuantizeConfig(torch.int4,
   group_size=32)`` (and int8 asymmetric per-token activations for 8da4w) on every
   ``nn.Linear``; for ``w4_g32_emb`` a second ``quantize_`` with the weight config alone and
   a ``filter_fn`` choosing the ``nn.Embedding`` modules (``FakeQuantizedEmbedding``). Same
   model, data order, steps, seed and learning rate. torchao comes from the environment (the
   dev extra) or from ``--peer-dir`` (``pip install --target .peers torchao==0.18.*
   --no-deps``, put on ``sys.path`` only while it is imported); if it does not import or run,
   the result says why. Its perplexity is that of its fake-quantized model (the QAT
   "prepare" model).
5. **ONNX**: the w4_g32 and w4_g32_emb QAT models, `convert`-ed and exported (Linears as
   ``MatMulNBits``; quantized embeddings as a blocked ``DequantizeLinear`` of the int4 table,
   then ``Gather``), in onnxruntime: test perplexity (each against its converted model's), ms
   per token of one ``--timing-length`` sequence (full forward, no cache) against the fp32
   model in onnxruntime and in eager torch (all rounds interleaved), file sizes (and their
   share of the fp32 ONNX file's).

Ours and torchao quantize the same layers in each scheme: every Linear (attention and MLP
projections, LM head), and the two embeddings in ``w4_g32_emb`` only; LayerNorms (and the
embeddings in the other schemes) stay float. Each phase's result counts its quantized Linears
and embeddings (``quantized_linears``, ``quantized_embeddings``). Our perplexities are
measured in eval mode, which for a QAT model is its integer simulation (= `convert`).

Run: ``python experiments/lm_stdlib.py --out /tmp/lm`` (``--smoke``: a few hundred bytes, a
tiny model, a few steps). Progress lines go to stderr; ``<out>/results.json``, a JSON line and
markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from lm_data import StdlibCorpus
from lm_models import SCHEMES, ByteGPT, LMModule, Scheme, fit, perplexity, quantized_layers
from lm_torchao import run_qat_torchao
from timing import cpu_model, round_robin

from qat_lightning import QATCallback, calibrate, convert, export_onnx
from qat_lightning.export import OnnxModel

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
    train_s = fit(module, exp.corpus.train_loader(), a.fp32_steps, "fp32", seed=a.seed, root=a.out)
    exp.fp32_state = copy.deepcopy(module.state_dict())
    return module, {"train_s": train_s, **exp.evaluate(module)}


def run_fp32_continued(exp: Experiment) -> dict:
    """The control: the fp32 model trained ``--qat-steps`` more at the QAT learning rate, no
    quantization (what QAT's extra steps alone are worth)."""
    a = exp.args
    module = exp.module(a.qat_lr, a.qat_steps)
    loader = exp.corpus.train_loader()
    train_s = fit(module, loader, a.qat_steps, "fp32 continued", seed=a.seed, root=a.out)
    return {"train_s": train_s, **exp.evaluate(module)}


def run_ptq(exp: Experiment, scheme: Scheme) -> dict:
    module = exp.module(exp.args.qat_lr, exp.args.qat_steps)
    calibrate(
        module,
        exp.calibration_batches(),
        inputs=scheme.inputs,
        params=scheme.params,
        skip=scheme.skip,
    )
    return {**quantized_layers(module), **exp.evaluate(module)}


def run_qat_ours(exp: Experiment, name: str, scheme: Scheme) -> tuple[LMModule, dict]:
    a = exp.args
    module = exp.module(a.qat_lr, a.qat_steps)
    callback = QATCallback(
        inputs=scheme.inputs,
        params=scheme.params,
        skip=scheme.skip,
        calibration_batches=a.calibration_batches,
        export_dir=a.out / f"qat_{name}",
        export_formats=(),
    )
    loader = exp.corpus.train_loader()
    train_s = fit(module, loader, a.qat_steps, f"qat ours {name}", [callback], a.seed, a.out)
    return module, {"train_s": train_s, **quantized_layers(module), **exp.evaluate(module)}


def file_bytes(path: Path) -> int:
    """The ONNX file and its external data files, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def run_onnx(exp: Experiment, qat: dict[str, LMModule], fp32: LMModule) -> dict:
    """The QAT models ``qat`` (scheme name -> module), `convert`-ed and exported, and the fp32
    model, in onnxruntime: test perplexity (each against its converted model's), ms per token
    (one round robin for all, with fp32 eager), file bytes."""
    a = exp.args
    test = exp.corpus.eval_loader("test")
    example = next(iter(test))[0][:2]  # batch 2: torch.export specializes a 1
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
    fp32_ort = OnnxModel(fp32_path, threads=a.threads)
    ids = torch.randint(0, 256, (1, a.timing_length), generator=torch.Generator().manual_seed(0))

    def eager() -> None:
        with torch.no_grad():
            float_model(ids)

    result: dict = {"fp32_onnx_test": perplexity(fp32_ort, test), "schemes": {}}
    timed = {"fp32_eager": eager, "fp32_onnx": lambda: fp32_ort(ids)}
    paths = {"fp32_onnx": fp32_path}
    for name, module in qat.items():
        counts = quantized_layers(module)
        converted = convert(module.model).eval()
        path = export_onnx(converted, example, a.out / f"lm_{name}.onnx")
        ort = OnnxModel(path, threads=a.threads)
        result["schemes"][name] = {
            **counts,
            "converted_test": perplexity(converted, test),
            "onnx_test": perplexity(ort, test),
        }
        timed[f"{name}_onnx"] = lambda ort=ort: ort(ids)
        paths[f"{name}_onnx"] = path
    seconds = round_robin(timed, runs=a.timing_runs, warmup=2)
    result["ms_per_token"] = {k: 1e3 * v / a.timing_length for k, v in seconds.items()}
    result["bytes"] = {k: file_bytes(p) for k, p in paths.items()}
    for name, r in result["schemes"].items():
        r["size_of_fp32"] = result["bytes"][f"{name}_onnx"] / result["bytes"]["fp32_onnx"]
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

    def counts(r: dict, key: str) -> str:
        return f"{r['qat_ours'][key]} / {r['qat_torchao'].get(key, '-')}"

    rows = [
        f"CPU: {results['cpu']}; test perplexity; recovered = (PTQ - QAT) / (PTQ - fp32), "
        f"controlled = 1 - (QAT - fp32 continued) / (PTQ - fp32); fp32 continued "
        f"{control:.3f}; quantized Linears and embeddings: ours / torchao",
        "",
        "| scheme | Linears | embeddings | fp32 | PTQ | QAT ours | QAT torchao | recovered ours "
        "| recovered torchao | controlled ours | controlled torchao |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["schemes"].items():
        ao = r["qat_torchao"].get("test", math.nan)
        rows.append(
            f"| {name} | {counts(r, 'quantized_linears')} | "
            f"{counts(r, 'quantized_embeddings')} | {fp32:.3f} | {r['ptq']['test']:.3f} | "
            f"{r['qat_ours']['test']:.3f} | {ao:.3f} | {pct(r['recovered_ours'])} | "
            f"{pct(r.get('recovered_torchao'))} | {pct(r['controlled_ours'])} | "
            f"{pct(r.get('controlled_torchao'))} |"
        )
    o = results["onnx"]
    ms, size = o["ms_per_token"], o["bytes"]
    rows += [
        "",
        "| QAT model (ONNX: MatMulNBits; embeddings: blocked DequantizeLinear) "
        "| quantized embeddings | test ppl | ms/token | bytes | size of fp32 ONNX |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in o["schemes"].items():
        rows += [
            f"| {name} converted (torch) | {r['quantized_embeddings']} | "
            f"{r['converted_test']:.4f} | | | |",
            f"| {name} ONNX (onnxruntime) | {r['quantized_embeddings']} | "
            f"{r['onnx_test']:.4f} | {ms[f'{name}_onnx']:.3f} | {size[f'{name}_onnx']} | "
            f"{pct(r['size_of_fp32'])} |",
        ]
    rows += [
        f"| fp32 ONNX (onnxruntime) | 0 | {o['fp32_onnx_test']:.4f} | {ms['fp32_onnx']:.3f} | "
        f"{size['fp32_onnx']} | 100.0 % |",
        f"| fp32 eager | 0 | {fp32:.4f} | {ms['fp32_eager']:.3f} | | |",
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
    results["schemes"], exported = {}, {}
    for name, scheme in SCHEMES.items():
        r = {"ptq": run_ptq(exp, scheme)}
        log(f"ptq {name} {r['ptq']}")
        module, r["qat_ours"] = run_qat_ours(exp, name, scheme)
        if scheme.onnx:
            exported[name] = module
        log(f"qat ours {name} {r['qat_ours']}")
        r["qat_torchao"] = run_qat_torchao(exp, name, scheme)
        log(f"qat torchao {name} {r['qat_torchao']}")
        base, ptq = results["fp32"]["test"], r["ptq"]["test"]
        control = results["fp32_continued"]["test"]
        for side in ("ours", "torchao"):
            if "test" in r[f"qat_{side}"]:
                qat = r[f"qat_{side}"]["test"]
                r[f"recovered_{side}"] = recovery(base, ptq, qat)
                r[f"controlled_{side}"] = recovery_controlled(base, ptq, control, qat)
        results["schemes"][name] = r
    results["onnx"] = run_onnx(exp, exported, fp32)
    log(f"onnx {results['onnx']}")
    results["wall_s"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
