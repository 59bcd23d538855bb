"""`train(cfg)`: one ``qat-train`` run, independent of the Hydra entry point (tests call it with
``compose``).

1. Check the config (`validate`): a bad value stops here, before any data is read.
2. Float phase: ``init_from`` a float checkpoint and/or ``fp32_epochs`` of training, through the
   fp32 cache (`Fp32Cache`): a sweep trains its float model once.
3. QAT phase: a new Trainer with `QATCallback` (swap, calibrate, fine-tune, export).
4. Evaluate on the test set: QAT-model accuracy, exported ONNX accuracy in onnxruntime and
   their top-1 agreement; write ``results.json`` (and ``quant_health.csv``) to the run directory.

Both phases save ``checkpoints/<phase>/last.ckpt`` every epoch. ``results.json`` is written when
the run starts (``"status": "running"``), and again when it ends: ``"completed"``,
``"interrupted"`` (Ctrl-C) or ``"failed"`` (with the error line). ``resume=<run dir>`` continues
an unfinished run in its directory: a finished float phase is not trained again, QAT restarts
from its ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat_lightning.app.datamodule import ImageDataModule
from qat_lightning.app.evaluation import (
    accuracy,
    evaluate,
    nbytes,
    onnx_weight_bytes,
    predict,
    quant_health,
)
from qat_lightning.app.fp32_cache import Fp32Cache, fp32_key
from qat_lightning.app.loggers import build_logger, finish, is_wandb, log_wandb_extras
from qat_lightning.app.models import build_model
from qat_lightning.app.module import Classifier
from qat_lightning.app.progress import progress_bar
from qat_lightning.app.ptq import PTQAccuracy, ptq_quant_config, ptq_results
from qat_lightning.app.rundir import Run, start_run, write_json
from qat_lightning.app.search import SearchOutcome, run_search
from qat_lightning.app.validation import (
    RESULT_METRICS,
    ConfigError,
    milestone,
    quant_overrides,
    validate,
)
from qat_lightning.callback import QATCallback

__all__ = ["onnx_weight_bytes", "qat_callback", "train"]

log = logging.getLogger(__name__)

# Lightning notices that say nothing about this app's small, single-process runs.
_QUIET = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*LeafSpec.*",
    r".*Total length of .* across ranks is zero.*",
)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        yield


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


# -- the phases -----------------------------------------------------------------------------------
def qat_callback(q: DictConfig, export_dir: Path) -> QATCallback:
    """`QATCallback` from the ``quant`` config node."""
    return QATCallback(
        inputs=None if q.inputs is None else OmegaConf.to_container(q.inputs, resolve=True),
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
    cfg: DictConfig, run: Run, logger: Any, epochs: int, callbacks: list, val: bool, phase: str
) -> pl.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    callbacks = list(callbacks)
    bar = progress_bar(cfg.callbacks.progress_bar, phase)
    if bar is not None:
        callbacks.append(bar)
    if cfg.callbacks.checkpoint:
        # last.ckpt at every epoch end, so an interrupted run can resume. (save_last=True with
        # save_top_k=0 writes it only when training ends: what a Ctrl-C loses.)
        last = run.last_ckpt(phase)
        callbacks.append(
            ModelCheckpoint(
                dirpath=last.parent,
                filename=last.stem,
                save_top_k=1,  # no monitor: the newest checkpoint, overwritten each epoch
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
    if cfg.callbacks.lr_monitor and logger is not None:
        callbacks.append(LearningRateMonitor())
    if cfg.callbacks.early_stopping_patience and val:
        patience = cfg.callbacks.early_stopping_patience
        callbacks.append(EarlyStopping(f"{phase}/val_acc", mode="max", patience=patience))
    t = cfg.trainer
    return pl.Trainer(
        max_epochs=epochs,
        default_root_dir=run.out,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=bool(cfg.callbacks.checkpoint),
        enable_progress_bar=bar is not None,
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


def _fit(trainer: pl.Trainer, module: Classifier, data: Any, run: Run, phase: str) -> None:
    """``trainer.fit``, from the phase's ``last.ckpt`` when resuming; counts finished epochs."""
    last = run.last_ckpt(phase)
    ckpt_path = last if run.resumed and last.is_file() else None
    if ckpt_path is not None:
        log.info("%s: resuming from %s", phase, ckpt_path)
    run.phase = phase
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:
        run.epochs[phase] = trainer.fit_loop.epoch_progress.current.completed


def fp32_cache(cfg: DictConfig, run: Run) -> Fp32Cache | None:
    """The run's fp32 cache entry: in ``fp32_cache_dir``, else the multirun's sweep directory,
    else next to the run directory; None when ``fp32_cache=false``."""
    if not cfg.fp32_cache:
        return None
    directory = cfg.fp32_cache_dir
    if directory is None:
        sweep = run.hydra.get("sweep_dir")
        directory = Path(sweep) / "fp32_cache" if sweep else run.out.parent / "fp32_cache"
    return Fp32Cache(Path(directory), fp32_key(cfg))


def float_phase(
    cfg: DictConfig, run: Run, module: Classifier, data: Any, logger: Any, extra: list
) -> float | None:
    """``init_from`` and/or ``fp32_epochs`` of float training (or their cached result); the
    float model's test accuracy (None when QAT starts from random weights)."""
    model = module.model
    if cfg.init_from:
        _load_float(model, cfg.init_from)
    if cfg.fp32_epochs > 0:
        finished = run.ckpt_dir / "fp32.pt"
        cache = fp32_cache(cfg, run)
        if run.resumed and finished.is_file():
            model.load_state_dict(torch.load(finished, map_location="cpu", weights_only=True))
            log.info("fp32: finished before, loaded %s", finished)
        else:
            with cache.lock() if cache else contextlib.nullcontext():
                if cache is not None and cache.load(model):
                    run.fp32_cache = str(cache.path)
                else:
                    log.info("float phase: %d epochs", cfg.fp32_epochs)
                    val = len(data.val_set) > 0
                    trainer = _trainer(cfg, run, logger, cfg.fp32_epochs, extra, val, "fp32")
                    _fit(trainer, module, data, run, "fp32")
                    if cache is not None:
                        cache.save(model)
            if cfg.callbacks.checkpoint:
                finished.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), finished)
        run.epochs["fp32"] = cfg.fp32_epochs
    if cfg.init_from or cfg.fp32_epochs > 0:
        run.fp32_accuracy = accuracy(*predict(model, data.test_dataloader()))
    return run.fp32_accuracy


def qat_phase(
    cfg: DictConfig, run: Run, module: Classifier, data: Any, logger: Any, extra: list
) -> tuple[QATCallback, PTQAccuracy, SearchOutcome | None]:
    """Optionally search per-layer bits, then calibrate, measure the PTQ accuracy, fine-tune
    with fake quantization (none when ``qat_epochs=0``) and export; the callback holds the
    paths."""
    quant = ptq_quant_config(cfg.quant) if cfg.qat_epochs == 0 else cfg.quant
    search = run_search(cfg.search, module.model, data, qat_callback(quant, run.out).config, logger)
    quant = search.quant_config(quant) if search is not None else quant
    qat = qat_callback(quant, run.out / "export")
    ptq = PTQAccuracy(data.test_dataloader(), stop=cfg.qat_epochs == 0)
    qat_lr = cfg.optim.qat_lr if cfg.optim.qat_lr is not None else cfg.optim.lr / 10
    epochs = max(cfg.qat_epochs, 1)  # qat_epochs=0: PTQAccuracy stops before a step
    module.start_phase("qat", float(qat_lr), epochs)
    # The same random stream whether the float phase trained, came from the cache or resumed.
    pl.seed_everything(cfg.seed + 1, workers=True, verbose=False)
    log.info("QAT phase: %d epochs", cfg.qat_epochs)
    val = len(data.val_set) > 0
    # ptq right after qat: it measures right after the calibration, before any step
    trainer = _trainer(cfg, run, logger, epochs, [qat, ptq, *extra], val, "qat")
    _fit(trainer, module, data, run, "qat")
    return qat, ptq, search


def _results(cfg: DictConfig, run: Run, module: Classifier, data: Any, qat: QATCallback) -> dict:
    """Everything ``results.json`` holds after a completed run (health rows aside)."""
    model = module.model
    results = run.status("completed", **evaluate(model, data.test_dataloader(), qat))
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    results["sizes"] = {
        "fp32_bytes": fp32_bytes,
        **{f"{fmt}_bytes": nbytes(Path(p)) for fmt, p in qat.export_paths.items()},
    }
    if "onnx" in qat.export_paths:
        results["sizes"]["onnx_weights_bytes"] = onnx_weight_bytes(qat.export_paths["onnx"])
    results["export_paths"] = {fmt: str(p) for fmt, p in qat.export_paths.items()}
    report = qat.report.to_dict() if qat.report is not None else {}
    results["quantization"] = {
        "counts": report.get("counts"),
        "warnings": report.get("warnings", []),
    }
    return results


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Float phase (optional), QAT, export and evaluation; returns what ``results.json`` holds.

    Args:
        cfg: the composed config.
        callbacks: extra Lightning callbacks for both phases' Trainers.

    Raises:
        ConfigError: a bad config value (one line), before anything trains.
        SystemExit: Ctrl-C (Lightning's graceful shutdown); ``results.json`` then says
            ``"status": "interrupted"``, and any other exception leaves ``"failed"``.
    """
    validate(cfg)
    run = start_run(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = ImageDataModule(cfg.data)
    data.setup()
    info = data.info
    model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes)
    module = Classifier(model, cfg.optim, epochs=cfg.fp32_epochs, num_classes=info.num_classes)
    run_name = cfg.run_name or run.hydra.get("job_name") or run.out.name
    logger = build_logger(cfg, run.out, run_name, run.hydra.get("group"), run.config)
    extra = list(callbacks or [])
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one
    try:
        with _quiet_warnings():
            float_phase(cfg, run, module, data, logger, extra)
            qat, ptq, search = qat_phase(cfg, run, module, data, logger, extra)
            run.phase = "evaluation"
            results = _results(cfg, run, module, data, qat)
            results.update(ptq_results(ptq, results["qat_accuracy"], cfg.qat_epochs))
            if search is not None:
                results["search"] = search.to_dict()
            health = quant_health(module, next(iter(data.test_dataloader()))[0])
            _write_results(cfg, run, logger, health, results)
    except BaseException as err:
        stopped = isinstance(err, (KeyboardInterrupt, SystemExit))
        error = None if stopped else f"{type(err).__name__}: {_first_line(str(err))}"
        write_json(
            run.out / "results.json",
            run.status("interrupted" if stopped else "failed", error=error),
        )
        log.error(
            "run %s in %s; continue with: qat-train resume=%s",
            "interrupted" if stopped else "failed",
            run.phase,
            run.out,
        )
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        finish(logger)
    log.info(
        "results: fp32 %s, QAT %.4f, ONNX %s, agreement %s -> %s",
        _fmt(results["fp32_accuracy"]),
        results["qat_accuracy"],
        _fmt(results["onnx_accuracy"]),
        _fmt(results["agreement"]),
        run.out / "results.json",
    )
    return results


def _write_results(
    cfg: DictConfig, run: Run, logger: Any, health: list, results: dict[str, Any]
) -> None:
    """Health summary into ``results``; ``results.json``, ``quant_health.csv``, the logger."""
    finite = [r["sqnr_db"] for r in health if r["sqnr_db"] is not None]
    results["health"] = {
        "quantizers": len(health),
        "min_sqnr_db": min(finite) if finite else None,
        "max_clip_rate": max((r["clip_rate"] or 0.0) for r in health) if health else None,
    }
    results["wall_time_s"] = round(time.perf_counter() - run.start, 2)
    _write_health(run.out / "quant_health.csv", health)
    write_json(run.out / "results.json", results)
    if is_wandb(logger):
        log_wandb_extras(logger, health, results, cfg.logger.log_health, cfg.logger.log_model)
    elif logger is not None:
        final = {k: results[k] for k in RESULT_METRICS if results[k] is not None}
        logger.log_metrics({f"test/{k}": v for k, v in final.items()})


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_health(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
