"""``search=mixed_precision``: per-layer sensitivity on the float model, bits chosen under a
size budget, then QAT with those bits.

The sensitivity runs on the model after the float phase, with the run's own quantization
config (schemes, skips, overrides), calibrated on training batches; its metric is top-1 on
validation batches (never the test set, which reports the result). Without a validation set
the search ranks layers by output SQNR alone, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat_lightning.analysis import (
    MixedPrecisionResult,
    SensitivityResult,
    mixed_precision,
    sensitivity,
)
from qat_lightning.app.loggers import is_wandb
from qat_lightning.app.validation import quant_overrides
from qat_lightning.surgery import QuantConfig

log = logging.getLogger(__name__)
SEARCHES = ("none", "mixed_precision")


class _AsInClassifier(nn.Module):
    """The bare model under the name the `Classifier` gives it (``model``), so layer names,
    the run's override patterns and the chosen overrides all read ``model.<layer>``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class SearchOutcome:
    """The sensitivity measured and the bits chosen."""

    sensitivity: SensitivityResult
    choice: MixedPrecisionResult
    metric: str

    def quant_config(self, quant: DictConfig) -> DictConfig:
        """``quant`` with the chosen weight (and activation) bits added to its overrides
        (after the run's own, so they win where both name a layer; the run's other fields for
        that layer stay)."""
        merged = quant_overrides(quant.overrides)
        for name, change in self.choice.overrides.items():
            own = dict(merged.get(name) or {})
            for role in ("params", "inputs"):  # inputs: only with an activation budget
                if role in change:
                    own[role] = {**(own.get(role) or {}), **change[role]}
            merged[name] = own
        node = OmegaConf.create(OmegaConf.to_container(quant, resolve=True))
        node.overrides = merged
        return node

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": "mixed_precision",
            "metric": self.metric,
            "chosen_bits": dict(self.choice.bits),
            **{k: v for k, v in self.choice.to_dict().items() if k != "bits"},
            "sensitivity": self.sensitivity.to_dict(),
        }


def _top1(loader: Any, batches: int):
    data = [b for _, b in zip(range(batches), loader, strict=False)]

    def metric(model: nn.Module) -> float:
        device = next(model.parameters()).device
        correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in data)
        return correct / sum(len(y) for _, y in data)

    return metric


def run_search(
    search: DictConfig, model: nn.Module, data: Any, config: QuantConfig, logger: Any = None
) -> SearchOutcome | None:
    """Sensitivity + `mixed_precision` for ``search=mixed_precision``; None for ``none``."""
    if search.name == "none":
        return None
    val = data.val_dataloader() if len(data.val_set) > 0 else None
    metric_name = "val_top1"
    if val is None:
        log.warning("search: no validation set; layers are ranked by output SQNR, not accuracy")
        metric_name = "output_sqnr"
    train = data.train_dataloader()
    calib = [x for (x, _), _ in zip(train, range(search.calibration_batches), strict=False)]
    result = sensitivity(
        _AsInClassifier(model),
        calib,
        None if val is None else _top1(val, search.eval_batches),
        bits=tuple(search.bits),
        which=("params",) if search.activation_budget is None else ("params", "inputs"),
        config=config,
    )
    log.info("search: per-layer sensitivity\n%s", result)
    choice = mixed_precision(result, search.size_budget, search.activation_budget)
    if choice.activation_bits:
        log.info("search: activation bits %s", choice.activation_bits)
    log.info(
        "search: weight bits %s, %.0f bytes (%.3f of fp32, budget %.0f)",
        choice.bits,
        choice.size_bytes,
        choice.size_bytes / choice.fp32_bytes,
        choice.budget_bytes,
    )
    if logger is not None and is_wandb(logger):
        log_sensitivity_wandb(logger, result)
    return SearchOutcome(result, choice, metric_name)


def log_sensitivity_wandb(logger: Any, result: SensitivityResult) -> None:
    """The sensitivity table (one row per layer and bit width) in the wandb run."""
    import wandb

    columns, rows = result.table()
    logger.experiment.log({"search/sensitivity": wandb.Table(columns=columns, data=rows)})
