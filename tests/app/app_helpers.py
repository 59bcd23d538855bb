"""Shared by the app tests: composing configs, running the console scripts, reading wandb's
offline run files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[2] / "conf"
# A few batches per phase: the whole path (float, calibration, QAT, export, onnxruntime).
TINY = [
    "qat_epochs=1",
    "quant.freeze_bn_at=null",  # epoch:1 (the default) is past a 1-epoch QAT phase
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "quant.calibration_batches=1",
    "data.max_test_samples=64",
    "callbacks.progress_bar=none",
    # tests share one tmp root: the default cache next to the run dir would leak between them
    "fp32_cache=false",
]
SWEEP_TINY = [*TINY, "fp32_epochs=0", "callbacks.checkpoint=false"]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``conf/config.yaml`` composed with ``overrides`` (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir

    from qat_lightning.app.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def offline_env(tmp: Path) -> dict[str, str]:
    """Environment for a subprocess: wandb offline with every wandb folder under ``tmp``."""
    env = dict(os.environ)
    env.update(wandb_env(tmp))
    return env


def wandb_env(tmp: Path) -> dict[str, str]:
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb_dir"),
        "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb_data"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
        "WANDB_SILENT": "true",
    }


def console_script(name: str) -> str:
    """The installed console script (``qat-train``, ``qat-report``) of this interpreter."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} is missing: install the package (pip install -e .)"
    return str(path)


def run_cli(
    name: str, args: list[str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    (cwd / "wandb_dir").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [console_script(name), *args],
        cwd=cwd,
        env=offline_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """The results.json of every job of a multirun, by job number."""
    paths = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in paths]


# -- wandb's offline run file (.wandb): LevelDB-style log of protobuf Records -------------------
_BLOCK = 32768
_HEADER = 7


def wandb_records(path: Path) -> Iterator[Any]:
    """Every Record of an offline run's ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, chunks = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            record = pb.Record()
            record.ParseFromString(chunks)
            yield record


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
