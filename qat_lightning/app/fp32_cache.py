"""The fp32 checkpoint cache: a sweep over quantization settings trains its float model once.

Every job of ``qat-train -m quant.params.bits=2,4,8`` starts QAT from the same float model, so
the float phase's weights are stored under a key made of everything that determines them (model,
data, ``fp32_epochs``, optimizer, seed, ``init_from``'s content, the trainer settings that change
training) and reused by every later job with the same key. A file lock per key makes parallel
jobs (the joblib launcher) wait for the one that trains it instead of training it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)

# Fields that change only how fast or where things run, never the float weights.
_DATA_IGNORED = ("num_workers", "eval_batch_size", "max_test_samples")
_TRAINER_KEYS = (
    "precision",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
    "deterministic",
)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fp32_key(cfg: DictConfig) -> dict[str, Any]:
    """What determines the float phase's weights, as plain values."""

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True)

    data = {k: v for k, v in plain(cfg.data).items() if k not in _DATA_IGNORED}
    optim = {k: v for k, v in plain(cfg.optim).items() if k != "qat_lr"}
    return {
        "model": plain(cfg.model),
        "data": data,
        "fp32_epochs": cfg.fp32_epochs,
        "optim": optim,
        "seed": cfg.seed,
        "init_from": _file_digest(cfg.init_from) if cfg.init_from else None,
        "trainer": {k: plain(cfg.trainer)[k] for k in _TRAINER_KEYS},
        "early_stopping_patience": cfg.callbacks.early_stopping_patience,
    }


class Fp32Cache:
    """One cache entry: ``<dir>/fp32-<digest>.pt`` (a state dict) and ``.json`` (its key).

    Args:
        directory: the shared cache directory.
        key: `fp32_key` of the run.
    """

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.key = key
        text = json.dumps(key, sort_keys=True, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.directory = Path(directory)
        self.path = self.directory / f"fp32-{self.digest}.pt"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the entry's file lock: a second job with the same key waits here."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path.with_suffix(".lock"))):
            yield

    def load(self, model: nn.Module) -> bool:
        """Load the cached weights into ``model``; False when there are none."""
        if not self.path.is_file():
            return False
        model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        log.info("fp32: reusing cached checkpoint %s", self.path)
        return True

    def save(self, model: nn.Module) -> None:
        """Store ``model``'s weights (atomically: a killed job leaves no half-written entry)."""
        temp = self.path.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), temp)
        self.path.with_suffix(".json").write_text(json.dumps(self.key, indent=2, default=str))
        os.replace(temp, self.path)
        log.info("fp32: cached checkpoint %s", self.path)
