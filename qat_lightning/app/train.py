"""`train(cfg)`: one ``qat-train`` run, independent of the Hydra entry point (tests call it with
``compose``).

1. Check the config (`validate`): a bad value stops here, before any data is read.
2. Float phase: ``init_from`` a float checkpoint and/or ``fp32_epochs`` of training.
3. QAT phase: a new Trainer with `QATCallback` (swap, calibrate, fine-tune, export).
4. Evaluate on the test set: fake-quant accuracy, exported ONNX accuracy in onnxruntime and
   their top-1 agreement; write ``results.json`` (and ``quant_health.csv``) to the run directory.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from qat_lightning.app.datamodule import ImageDataModule
from qat_lightning.app.loggers import build_logger, finish, is_wandb, log_wandb_extras
from qat_lightning.app.models import build_model
from qat_lightning.app.module import Classifier
from qat_lightning.app.ptq import PTQAccuracy, ptq_quant_config, ptq_results
from qat_lightning.app.search import run_search
from qat_lightning.app.validation import (
    RESULT_METRICS,
    ConfigError,
    milestone,
    quant_overrides,
    validate,
)
from qat_lightning.callback import QATCallback
from qat_lightning.callback.health import HealthProbe, named_quantizers
from qat_lightning.nn import fake_quant_eval

log = logging.getLogger(__name__)

# Lightning notices that say nothing about this app's small, single-process runs.
_QUIET = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*module\(s\) in eval mode.*",
    r".*LeafSpec.*",
    r".*Total length of .* across ranks is zero.*",
)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _hydra_run() -> dict[str, Any]:
    """Output dir, overrides and sweep group of the Hydra job this runs in (empty outside)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = "_".join(Path(hc.sweep.dir).parts[-2:])
    return {
        "output_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "job_name": hc.job.override_dirname or "default",
        "group": group,
        "job_num": hc.job.get("num"),
    }


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the whole loader, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def onnx_predict(path: Path, loader: DataLoader) -> np.ndarray:
    """Logits of the exported model in onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x.numpy()})[0] for x, _ in loader])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


@torch.no_grad()
def quant_health(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per quantizer: bits, mean scale and zero point, clip rate and SQNR on the batch ``x``.

    Runs the fake-quant arithmetic (`fake_quant_eval`): the probe reads what reaches each
    quantizer, and eval mode's integer path calls none of them.
    """
    model.eval()
    probe = HealthProbe(model).attach()
    with torch.no_grad(), fake_quant_eval():
        model(x.to(next(model.parameters()).device))
    metrics = probe.detach()
    rows = []
    for name, quantizer in named_quantizers(model):
        figures = {
            key: metrics.get(f"quant/{name}/{key}")
            for key in ("scale", "zero_point", "clip_rate", "sqnr_db")
        }
        if figures["scale"] is None:
            continue
        kind = "param" if ".param_quantizers." in f".{name}." else "activation"
        rows.append({"quantizer": name, "kind": kind, "bits": quantizer.scheme.bits, **figures})
    return rows


def _nbytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the ONNX model's initializers (weights, scales, zero points): its size without
    the graph and the exporter's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _load_float(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"init_from={path} is invalid: not a torch checkpoint ({err})") from err
    state = state.get("state_dict", state)
    if all(k.startswith("model.") for k in state):  # a Classifier checkpoint (.ckpt)
        state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ConfigError(
            f"init_from={path} is invalid: it does not fit this model "
            f"({'missing' if missing else 'unexpected'} key {first!r}); allowed a float "
            "checkpoint of the same model config"
        )


def evaluate(model: nn.Module, test: DataLoader, qat: QATCallback) -> dict[str, Any]:
    """Fake-quant accuracy, exported-ONNX accuracy and their top-1 agreement on ``test``."""
    for _, quantizer in named_quantizers(model):  # evaluation must not move the encodings
        quantizer.enable_observer(False)
    qat_logits, labels = predict(model, test)
    results: dict[str, Any] = {
        "qat_accuracy": accuracy(qat_logits, labels),
        "onnx_accuracy": None,
        "agreement": None,
        "test_samples": len(labels),
    }
    if "onnx" in qat.export_paths:
        onnx_logits = onnx_predict(qat.export_paths["onnx"], test)
        results["onnx_accuracy"] = accuracy(onnx_logits, labels)
        results["agreement"] = float((onnx_logits.argmax(1) == qat_logits.argmax(1)).mean())
    return results


# -- the run --------------------------------------------------------------------------------------
def qat_callback(q: DictConfig, export_dir: Path) -> QATCallback:
    """`QATCallback` from the ``quant`` config node."""
    return QATCallback(
        inputs=OmegaConf.to_container(q.inputs, resolve=True),
        params=OmegaConf.to_container(q.params, resolve=True),
        calibration_batches=q.calibration_batches,
        freeze_bn_at=milestone(q.freeze_bn_at, "quant.freeze_bn_at"),
        freeze_observers_at=milestone(q.freeze_observers_at, "quant.freeze_observers_at"),
        quant_delay=milestone(q.quant_delay, "quant.quant_delay"),
        overrides=quant_overrides(q.overrides),
        skip=list(q.skip),
        fuse=q.fuse,
        integer_eval=q.integer_eval,
        export_dir=export_dir,
        export_formats=list(q.export_formats),
        log_every_n_steps=q.log_every_n_steps,
    )


def _trainer(
    cfg: DictConfig, out: Path, logger: Any, epochs: int, callbacks: list, val: bool, phase: str
) -> pl.Trainer:
    from lightning.pytorch.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        RichProgressBar,
        TQDMProgressBar,
    )

    bar = cfg.callbacks.progress_bar
    callbacks = list(callbacks)
    if bar != "none":
        callbacks.append(TQDMProgressBar() if bar == "tqdm" else RichProgressBar())
    if cfg.callbacks.lr_monitor and logger is not None:
        callbacks.append(LearningRateMonitor())
    if cfg.callbacks.early_stopping_patience and val:
        patience = cfg.callbacks.early_stopping_patience
        callbacks.append(EarlyStopping(f"{phase}/val_acc", mode="max", patience=patience))
    t = cfg.trainer
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=out,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        enable_progress_bar=bar != "none",
        enable_model_summary=False,
        accelerator=t.accelerator,
        devices=t.devices,
        precision=t.precision,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches if val else 0,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        num_sanity_val_steps=t.num_sanity_val_steps,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Float phase (optional), QAT, export and evaluation; returns what ``results.json`` holds.

    Raises:
        ConfigError: a bad config value (one line), before anything trains.
    """
    validate(cfg)
    start = time.perf_counter()
    hydra_run = _hydra_run()
    out = Path(
        cfg.output_dir or hydra_run.get("output_dir") or time.strftime("outputs/%Y-%m-%d/%H-%M-%S")
    )
    out.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    run_name = cfg.run_name or hydra_run.get("job_name") or out.name
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    data = ImageDataModule(cfg.data)
    data.setup()
    info = data.info
    model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    module = Classifier(model, cfg.optim, epochs=cfg.fp32_epochs)
    has_val = len(data.val_set) > 0
    logger = build_logger(cfg, out, run_name, hydra_run.get("group"), config)
    ckpt_dir = out / "checkpoints"
    try:
        with _quiet_warnings():
            fp32_acc = None
            if cfg.init_from:
                _load_float(model, cfg.init_from)
            if cfg.fp32_epochs > 0:
                log.info("float phase: %d epochs", cfg.fp32_epochs)
                fp32_trainer = _trainer(cfg, out, logger, cfg.fp32_epochs, [], has_val, "fp32")
                fp32_trainer.fit(module, datamodule=data)
                if cfg.callbacks.checkpoint:
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(model.state_dict(), ckpt_dir / "fp32.pt")
            if cfg.init_from or cfg.fp32_epochs > 0:
                fp32_acc = accuracy(*predict(model, data.test_dataloader()))

            quant = ptq_quant_config(cfg.quant) if cfg.qat_epochs == 0 else cfg.quant
            search = run_search(cfg.search, model, data, qat_callback(quant, out).config, logger)
            quant = search.quant_config(quant) if search is not None else quant
            qat = qat_callback(quant, out / "export")
            ptq = PTQAccuracy(data.test_dataloader(), stop=cfg.qat_epochs == 0)
            callbacks: list = [qat, ptq]  # ptq after qat: it measures right after calibration
            if cfg.callbacks.checkpoint:
                from lightning.pytorch.callbacks import ModelCheckpoint

                callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True))
            qat_lr = cfg.optim.qat_lr if cfg.optim.qat_lr is not None else cfg.optim.lr / 10
            epochs = max(cfg.qat_epochs, 1)  # qat_epochs=0: PTQAccuracy stops before a step
            module.start_phase("qat", float(qat_lr), epochs)
            log.info("QAT phase: %d epochs", cfg.qat_epochs)
            qat_trainer = _trainer(cfg, out, logger, epochs, callbacks, has_val, "qat")
            qat_trainer.fit(module, datamodule=data)

            results = {"fp32_accuracy": fp32_acc, **evaluate(model, data.test_dataloader(), qat)}
            results.update(ptq_results(ptq, results["qat_accuracy"], cfg.qat_epochs))
            if search is not None:
                results["search"] = search.to_dict()
            health = quant_health(model, next(iter(data.test_dataloader()))[0])
        results["sizes"] = {
            "fp32_bytes": fp32_bytes,
            **{f"{fmt}_bytes": _nbytes(Path(p)) for fmt, p in qat.export_paths.items()},
        }
        if "onnx" in qat.export_paths:
            results["sizes"]["onnx_weights_bytes"] = onnx_weight_bytes(qat.export_paths["onnx"])
        results["export_paths"] = {fmt: str(p) for fmt, p in qat.export_paths.items()}
        report = qat.report.to_dict() if qat.report is not None else {}
        results["quantization"] = {
            "counts": report.get("counts"),
            "warnings": report.get("warnings", []),
        }
        finite = [r["sqnr_db"] for r in health if r["sqnr_db"] is not None]
        results["health"] = {
            "quantizers": len(health),
            "min_sqnr_db": min(finite) if finite else None,
            "max_clip_rate": max((r["clip_rate"] or 0.0) for r in health) if health else None,
        }
        results["wall_time_s"] = round(time.perf_counter() - start, 2)
        results["output_dir"] = str(out)
        results["overrides"] = hydra_run.get("overrides", [])
        results["sweep_group"] = hydra_run.get("group")
        results["job_num"] = hydra_run.get("job_num")
        results["config"] = config
        _write_health(out / "quant_health.csv", health)
        _write_json(out / "results.json", results)
        if is_wandb(logger):
            log_wandb_extras(logger, health, results, cfg.logger.log_health, cfg.logger.log_model)
        elif logger is not None:
            final = {k: results[k] for k in RESULT_METRICS if results[k] is not None}
            logger.log_metrics({f"test/{k}": v for k, v in final.items()})
    finally:
        finish(logger)
    log.info(
        "results: fp32 %s, QAT %.4f, ONNX %s, agreement %s -> %s",
        _fmt(results["fp32_accuracy"]),
        results["qat_accuracy"],
        _fmt(results["onnx_accuracy"]),
        _fmt(results["agreement"]),
        out / "results.json",
    )
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temp, path)


def _write_health(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
