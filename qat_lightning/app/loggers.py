"""Loggers for ``qat-train`` (``logger=csv|tensorboard|wandb|none``), and what only wandb gets:
per-layer quantization health as a Table with plots, the exported model as an Artifact, and
offline mode whenever there is no API key (passed to the run, never set in the environment).
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    """An API key in ``WANDB_API_KEY`` or in the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None, save_dir: Path) -> str:
    """``online``, ``offline`` or ``disabled``. Online without a key would prompt or fail, so
    that falls back to offline and says so in one line. The environment is left alone: a
    ``WANDB_MODE`` set here would leak into every later job of a multirun."""
    mode = requested or os.environ.get("WANDB_MODE") or "online"
    if mode == "dryrun":
        mode = "offline"
    if mode == "online" and not has_wandb_key():
        log.warning(
            "wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline under %s, "
            "upload later with `wandb sync`",
            save_dir / "wandb",
        )
        mode = "offline"
    return mode


def build_logger(
    cfg: Any, out_dir: Path, run_name: str, group: str | None, config: dict[str, Any]
) -> Logger | None:
    """The Lightning logger the ``logger`` node names, with the resolved config logged."""
    name = cfg.logger.name
    if name == "none":
        return None
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger: Logger = CSVLogger(save_dir=out_dir, name="logs", version="")
    elif name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=out_dir, name="tensorboard", version="")
    else:
        from lightning.pytorch.loggers import WandbLogger

        lcfg = cfg.logger
        save_dir = Path(os.environ.get("WANDB_DIR") or out_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(
            project=lcfg.project,
            entity=lcfg.entity,
            name=run_name,
            group=lcfg.group or group,
            job_type=lcfg.job_type,
            tags=list(lcfg.tags) + list(cfg.tags),
            save_dir=str(save_dir),
            # wandb.init's own mode: WandbLogger(offline=True) would set WANDB_MODE=dryrun in
            # os.environ (Lightning 2.x), which a multirun's later jobs would inherit.
            mode=wandb_mode(lcfg.mode, save_dir),
            log_model=False,  # the exported integer model goes up as our own Artifact
        )
    logger.log_hyperparams(config)
    return logger


def is_wandb(logger: Logger | None) -> bool:
    return type(logger).__name__ == "WandbLogger"


def log_wandb_extras(
    logger: Logger,
    health: list[dict[str, Any]],
    results: dict[str, Any],
    log_health: bool,
    log_model: bool,
) -> None:
    """Health table, SQNR bar plot and histograms, run summary and the model Artifact."""
    import wandb

    run = logger.experiment
    if log_health and health:
        columns = list(health[0])
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in health])
        finite = [r for r in health if r.get("sqnr_db") is not None and math.isfinite(r["sqnr_db"])]
        payload: dict[str, Any] = {
            "quant/health": table,
            "quant/sqnr_by_quantizer": wandb.plot.bar(
                table, "quantizer", "sqnr_db", title="SQNR per quantizer (dB)"
            ),
        }
        if finite:
            payload["quant/sqnr_db_hist"] = wandb.Histogram([r["sqnr_db"] for r in finite])
            payload["quant/clip_rate_hist"] = wandb.Histogram([r["clip_rate"] for r in finite])
        run.log(payload)
    summary = {
        k: results[k] for k in ("fp32_accuracy", "qat_accuracy", "onnx_accuracy") if k in results
    }
    summary.update({"agreement": results.get("agreement"), **results.get("sizes", {})})
    run.summary.update({k: v for k, v in summary.items() if v is not None})
    paths = results.get("export_paths", {})
    if log_model and paths:
        artifact = wandb.Artifact(
            name=f"qat-model-{run.id}",
            type="model",
            description="QAT export: QDQ ONNX and native integer weights + encodings",
            metadata={
                "inputs": results["config"]["quant"]["inputs"],
                "params": results["config"]["quant"]["params"],
                **{k: v for k, v in summary.items() if v is not None},
            },
        )
        for fmt, path in paths.items():
            path = Path(path)
            if path.is_dir():
                artifact.add_dir(str(path), name=fmt)
            elif path.is_file():
                artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact, aliases=["latest"])


def finish(logger: Logger | None) -> None:
    """Flush the logger; for wandb, end the run so the next job of a multirun starts its own."""
    if logger is None:
        return
    logger.finalize("success")
    if is_wandb(logger):
        import wandb

        wandb.finish()
