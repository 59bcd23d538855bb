"""What the callback writes and prints: the report at fit start, the summary at fit end."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from qat_lightning.callback.exporting import export_size


def log_dir(trainer: pl.Trainer) -> Path:
    """The trainer's log dir. Under DDP, `trainer.log_dir` broadcasts: call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def check_writable(out_dir: Path, given: Path | None) -> None:
    """Fail before training if the export directory cannot be created and written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".qat_write_test"):
            pass
    except OSError as error:
        what = f"export_dir={str(given)!r}" if given is not None else f"export_dir=None ({out_dir})"
        raise ValueError(
            f"QATCallback({what}) is not writable: {error}; allowed a directory this process "
            "can create and write, checked before training so the fit's time is not lost"
        ) from error


def validation_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last logged validation metrics (names, after any ``phase/`` prefix, starting with
    ``val``)."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.rsplit("/", 1)[-1].startswith("val") and getattr(v, "numel", lambda: 1)() == 1
    }


def summary(trainer: pl.Trainer, paths: dict[str, Path], integer_eval: bool) -> str:
    """One line: the last validation metrics and what was exported, with sizes."""
    metrics = validation_metrics(trainer)
    kind = "integer model" if integer_eval else "fake quant"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    parts = [f"last validation ({kind}): {shown}"] if shown else []
    parts += [f"{fmt} {path} ({export_size(path) / 1024:.1f} KiB)" for fmt, path in paths.items()]
    return "QATCallback: done; " + "; ".join(parts or ["nothing exported"])


def log_report(trainer: pl.Trainer, report: Any, log_dir: Path) -> None:
    """The quantization report, as text in the log dir and as a table where a logger has one."""
    text = str(report)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "qat_report.txt").write_text(text + "\n")
    rows = report.to_dict().get("rows", [])
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_text") and rows:  # wandb
            columns = list(rows[0].keys())
            logger.log_text(
                key="qat/report", columns=columns, data=[[str(r[c]) for c in columns] for r in rows]
            )
        elif hasattr(experiment, "add_text"):  # tensorboard
            experiment.add_text("qat/report", "```\n" + text + "\n```")
