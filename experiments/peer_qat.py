"""Experiment 3 of the real-data issue: QAT side by side with peers, same data, epochs and seed.

ResNet-20 on CIFAR-10 at W8A8, fine-tuned from one float checkpoint (``--fp32``) by:

- **qat_lightning**: `quantize_model` (per-channel symmetric int8 weights, affine uint8
  activations with moving min/max, Conv+BN(+ReLU) fused the QAT way), exported with
  `export_onnx` and run in onnxruntime;
- **torch.ao eager QAT**: a twin of the model with ``QuantStub``/``DeQuantStub`` and
  ``FloatFunctional.add_relu`` for the residual add, ``fuse_modules_qat``, ``prepare_qat`` with
  ``get_default_qat_qconfig("x86")`` (its activations use ``reduce_range``: 7-bit codes),
  ``convert`` to an int8 model run by torch's x86 engine;
- **Brevitas** (with ``--brevitas-path DIR``, a separate ``pip install --target``):
  ``QuantConv2d``/``QuantLinear`` with ``Int8WeightPerChannelFloat``, ``QuantReLU`` with
  ``Uint8ActPerTensorFloat``, int8 ``QuantIdentity`` on the input, the residual branches and the
  logits; BN stays unfolded (Brevitas' usual QAT), exported with ``export_onnx_qcdq``.

Each side runs what ``qat-train experiment=cifar10_resnet20 fp32_epochs=0 init_from=...`` runs
in its QAT phase, as plain loops: the project's `ImageDataModule` (augmented, batch 128), SGD
lr 0.01 momentum 0.9 wd 5e-4 cosine over the epochs, calibration on the first 8 train batches
(observers on, fake quant off, BN statistics restored), BN frozen at epoch 3, observers at 4;
``seed_everything(seed)`` before each side, so all see the same batches. Train-step times come
from a round-robin phase on fresh models and the float model (lr 0), so load hits all alike.
Latency: exported models (ours and Brevitas in onnxruntime, torch.ao's converted model) against
the float model in eager torch ("float"), batch 1 and ``--batch``. CPU only, ``--threads`` for
torch and onnxruntime alike (use 1 when other jobs share the cores: 2 OpenMP threads on busy
cores stall). Size: exported file (torch.ao: its saved state_dict; float: the checkpoint).

The three models are built in `peer_models.py`; `timing.py` times them.

Run: ``python experiments/peer_qat.py --fp32 /tmp/exp2/c10_fp32/checkpoints/fp32.pt
--brevitas-path /tmp/brevitas_pkgs`` (``--quick --synthetic``: a smoke run without data).
Prints per-epoch progress to stderr, then one JSON line and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from importlib import import_module
from pathlib import Path

import lightning
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from peer_models import brevitas_model, float_model, ours_model, torch_ao_model
from timing import round_robin
from torch import nn
from torch.ao import quantization as tq
from torchmetrics.classification import MulticlassAccuracy

from qat_lightning.app.datamodule import ImageDataModule, ImageDataset
from qat_lightning.app.evaluation import accuracy, onnx_weight_bytes
from qat_lightning.app.models import ResNetCifar
from qat_lightning.export import export_onnx
from qat_lightning.quant import Quantizer

SIDES = ("qat_lightning", "torch_ao", "brevitas")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------
def data_module(args: argparse.Namespace) -> ImageDataModule:
    """conf/data/cifar10.yaml at ``--data-root``, or random images with ``--synthetic``."""
    cfg = OmegaConf.create(
        {"name": "cifar10", "root": args.data_root, "batch_size": args.batch,
         "eval_batch_size": 256, "num_workers": 0, "val_fraction": 0.1, "augment": True,
         "max_train_samples": args.max_train, "max_test_samples": args.max_test, "seed": 0}
    )  # fmt: skip
    data = ImageDataModule(cfg)
    if args.synthetic:
        gen = torch.Generator().manual_seed(1234)
        sizes = {"train": args.max_train or 512, "val": 0, "test": args.max_test or 256}
        for split, n in sizes.items():
            images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
            labels = torch.randint(0, 10, (n,), generator=gen)
            setattr(data, f"{split}_set", ImageDataset(images, labels, data.info, split == "train"))
    data.setup()
    return data


# -- calibration and schedule, per side ---------------------------------------------------------
def _quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


@contextlib.contextmanager
def _ours_calibration(model: nn.Module):
    with contextlib.ExitStack() as stack:  # observers on, fake quant off; encodings on exit
        for quantizer in _quantizers(model):
            stack.enter_context(quantizer.compute_encodings())
        yield
    for quantizer in _quantizers(model):  # as QATCallback: min/max observers keep tracking
        quantizer.enable_observer(quantizer.scheme.observer in ("minmax", "moving_minmax"))


@contextlib.contextmanager
def _ao_calibration(model: nn.Module):
    model.apply(tq.disable_fake_quant).apply(tq.enable_observer)
    yield
    for fq in model.modules():  # the fused op computes qparams only with fake quant on
        if isinstance(fq, tq.FakeQuantizeBase):
            scale, zero_point = fq.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
    model.apply(tq.enable_fake_quant)


def _freeze(side: str, model: nn.Module, bn: bool, observers: bool) -> None:
    """BN statistics and observers frozen, each side its own way (every epoch, after train())."""
    if observers and side == "torch_ao":
        model.apply(tq.disable_observer)
    for module in model.modules():
        if bn and hasattr(module, "freeze_bn_stats"):  # ours and torch.ao's fused Conv+BN
            module.freeze_bn_stats()
        elif bn and side == "brevitas" and isinstance(module, nn.BatchNorm2d):
            module.eval()  # Brevitas keeps plain BN (model.train() undoes this)
        elif observers and isinstance(module, Quantizer):
            module.enable_observer(False)
    # Brevitas: weight scales come from the weights, activation scales are learned parameters


CALIBRATION = {
    "qat_lightning": _ours_calibration,
    "torch_ao": _ao_calibration,
    "brevitas": lambda m: import_module("brevitas.graph.calibrate").calibration_mode(m),
}
BUILD = {"qat_lightning": ours_model, "torch_ao": torch_ao_model, "brevitas": brevitas_model}


@torch.no_grad()
def calibrate(side: str, model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Train-mode forwards under the side's calibration mode; BN statistics restored."""
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    with CALIBRATION[side](model):
        for x in batches:
            model(x)
            for bn, state in zip(bns, saved, strict=True):
                bn.load_state_dict(state)


# -- training and evaluation ----------------------------------------------------------------------
def train(side: str, model: nn.Module, data: ImageDataModule, args: argparse.Namespace) -> dict:
    lightning.seed_everything(args.seed, workers=True, verbose=False)
    loader = data.train_dataloader()
    calibrate(side, model, [x for _, (x, _) in zip(range(args.calibration), loader, strict=False)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    steps, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        _freeze(side, model, epoch >= args.freeze_bn_at, epoch >= args.freeze_observers_at)
        losses, train_acc = [], None
        for x, y in loader:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            steps.append(time.perf_counter() - t0)
            losses.append(loss.item())
            train_acc = train_acc or MulticlassAccuracy(logits.shape[1], average="micro")
            train_acc.update(logits.detach(), y)
        schedule.step()
        acc = float(train_acc.compute())
        log(f"[{side}] epoch {epoch + 1}/{args.epochs}: loss {statistics.mean(losses):.4f} "
            f"train acc {acc:.4f} ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    _freeze(side, model, False, True)  # evaluation must not move encodings (torch.ao would)
    return {
        "train_s": round(time.perf_counter() - start, 1),
        "train_loop_median_step_s": round(statistics.median(steps), 4) if steps else None,
    }


@torch.no_grad()
def predict(fn, loader) -> tuple[np.ndarray, np.ndarray]:
    out, labels = [], []
    for x, y in loader:
        out.append(np.asarray(fn(x)))
        labels.append(y.numpy())
    return np.concatenate(out), np.concatenate(labels)


def ort_runner(path: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # Brevitas' export leaves initializers in the graph inputs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def torch_runner(model: nn.Module):
    model.eval()
    return torch.no_grad()(lambda x: model(x).numpy())


def export(side: str, model: nn.Module, x: torch.Tensor, out: Path, threads: int):
    """The deployable model of a side: (runner, bytes on disk, what it is)."""
    model.eval()
    if side == "qat_lightning":
        path = export_onnx(model, x, out / "resnet20_ours.onnx", input_names=["input"])
        return ort_runner(path, threads), path.stat().st_size, onnx_weight_bytes(path)
    if side == "torch_ao":
        converted = tq.convert(copy.deepcopy(model).eval())
        buffer = io.BytesIO()
        torch.save(converted.state_dict(), buffer)
        return torch_runner(converted), buffer.tell(), None
    from brevitas.export import export_onnx_qcdq

    path = out / "resnet20_brevitas_qcdq.onnx"
    export_onnx_qcdq(model, args=x, export_path=str(path), input_names=["input"],
                     dynamic_axes={"input": {0: "batch"}}, dynamo=False)  # fmt: skip
    return ort_runner(path, threads), path.stat().st_size, onnx_weight_bytes(path)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()  # lr 0: the step costs what a real one does and changes nothing
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


# -- the run --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, help="float ResNetCifar state_dict (torch.save)")
    parser.add_argument("--data-root", default="/work/shared/data/cifar10-partial")
    parser.add_argument("--synthetic", action="store_true", help="random images, no data needed")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches")
    parser.add_argument("--freeze-bn-at", type=int, default=3, help="epoch")
    parser.add_argument("--freeze-observers-at", type=int, default=4, help="epoch")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step-rounds", type=int, default=10, help="timed train-step rounds")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--brevitas-path", default=None, help="dir of a pip --target install")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported models here")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.batch, args.calibration, args.step_rounds = 2, 32, 2, 2
        args.freeze_bn_at, args.freeze_observers_at, args.latency_runs = 1, 1, 2
        args.max_train, args.max_test = args.max_train or 128, args.max_test or 64
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    out = args.out or Path(tempfile.mkdtemp(prefix="peer_qat_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.fp32 is None:
        args.fp32 = out / "fp32_random_init.pt"
        torch.manual_seed(args.seed)
        torch.save(ResNetCifar(3, 10).state_dict(), args.fp32)
    state = torch.load(args.fp32, map_location="cpu", weights_only=True)
    sides = list(SIDES[:2])
    errors: dict[str, str] = {}
    if args.brevitas_path:
        sys.path.insert(0, args.brevitas_path)
        sides.append("brevitas")
    else:
        errors["brevitas"] = "not run: no --brevitas-path"

    data = data_module(args)
    test = data.test_dataloader()
    fp32 = float_model(state).eval()
    fp32_logits, labels = predict(torch_runner(fp32), test)
    x_test = next(iter(test))[0][: args.batch]
    log(f"fp32 checkpoint: test acc {accuracy(fp32_logits, labels):.4f} on {len(labels)} images")
    results, runners = {}, {"float": torch_runner(fp32)}
    for side in sides:
        stage, exported, runner, nbytes, weight_bytes = "build", None, None, None, None
        try:
            model = BUILD[side](state)
            stage, figures = "train", train(side, model, data, args)
            stage, (qat_logits, _) = "evaluate", predict(torch_runner(model), test)
            stage = "export"
            runner, nbytes, weight_bytes = export(side, model, x_test, out, args.threads)
            exported, _ = predict(runner, test)
        except Exception as error:  # a peer that fails is a figure too; ours must not
            if side == "qat_lightning":
                raise
            errors[side] = f"{stage}: {type(error).__name__}: {error}"[:2000]
            log(f"[{side}] failed at {stage}: {errors[side][:300]}")
            if stage != "export":
                continue
        agree = None if exported is None else (exported.argmax(1) == qat_logits.argmax(1)).mean()
        results[side] = figures | {
            "fake_quant_accuracy": accuracy(qat_logits, labels),
            "exported_accuracy": None if exported is None else accuracy(exported, labels),
            "agreement": None if agree is None else float(agree),
            "exported_bytes": nbytes,
            "exported_weight_bytes": weight_bytes,
        }
        if runner is not None and exported is not None:
            runners[side] = runner
        log(f"[{side}] {json.dumps(results[side])}")

    log("timing train steps (fresh models, round robin) and exported-model latency")
    x, y = next(iter(data.train_dataloader()))
    models = {"float": float_model(state)}
    for side in results:
        models[side] = BUILD[side](state)
        calibrate(side, models[side], [x])
    step_s = round_robin({k: step_fn(m, x, y) for k, m in models.items()}, args.step_rounds, 1)
    latency = {}
    for xb in (x_test[:1], x_test):
        fns = {k: (lambda r=r, xb=xb: r(xb)) for k, r in runners.items()}
        ms = round_robin(fns, args.latency_runs, 2)
        latency[f"batch_{len(xb)}"] = {k: round(v * 1000, 3) for k, v in ms.items()}
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {
        "experiment": "peer_qat",
        "model": "resnet20",
        "setup": setup | {"torch": torch.__version__, "onnxruntime": ort.__version__,
                          "out": str(out), "train_samples": len(data.train_set),
                          "test_samples": len(labels)},
        "fp32_accuracy": accuracy(fp32_logits, labels),
        "fp32_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "sides": results,
        "errors": errors,
        "median_step_s": {k: round(v, 4) for k, v in step_s.items()},
        "step_ratio_over_float": {k: round(v / step_s["float"], 3) for k, v in step_s.items()},
        "latency_ms": latency,
    }  # fmt: skip
    print(json.dumps(summary))
    print_table(summary)


def print_table(s: dict) -> None:
    def cell(value, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lat = s["latency_ms"]
    print("\n| model | test acc | exported acc | step s (x float) | "
          + "".join(f"{k} ms | " for k in lat) + "exported KiB |")  # fmt: skip
    print("|---|---:|---:|---:|" + "---:|" * (len(lat) + 1))
    rows = {"float": {"fake_quant_accuracy": s["fp32_accuracy"], "exported_accuracy": None,
                     "exported_bytes": s["fp32_bytes"]}} | s["sides"]  # fmt: skip
    for side, r in rows.items():
        ms = "".join(f"{cell(t.get(side), '.2f')} | " for t in lat.values())
        size = None if r["exported_bytes"] is None else r["exported_bytes"] / 1024
        print(f"| {side} | {cell(r['fake_quant_accuracy'])} | {cell(r['exported_accuracy'])} | "
              f"{s['median_step_s'][side]:.3f} ({s['step_ratio_over_float'][side]:.2f}) | "
              f"{ms}{cell(size, '.1f')} |")  # fmt: skip
    for side, error in s["errors"].items():
        print(f"\n{side}: {error[:500]}")


if __name__ == "__main__":
    main()
