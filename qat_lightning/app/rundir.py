"""The run directory of ``qat-train`` and its ``results.json`` while the run is unfinished.

``results.json`` says ``"status": "running"`` from the start (with the config, so that even a
killed run can be resumed), and ``"interrupted"`` or ``"failed"`` with what is known (phase,
finished epochs, checkpoints, the float accuracy) when the run stops early. ``resume=<run dir>``
continues such a run in its own directory, with its own config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat_lightning.app.validation import ConfigError, invalid

log = logging.getLogger(__name__)

# Keys a resumed run may change: where and how it reports, not what it computes.
_RESUME_FREE = (
    "resume",
    "output_dir",
    "run_name",
    "callbacks",
    "logger",
    "tags",
    "fp32_cache",
    "fp32_cache_dir",
)


def hydra_run() -> dict[str, Any]:
    """Output dir, overrides and sweep group of the Hydra job this runs in (empty outside)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    group = sweep_dir = None
    if hc.mode == RunMode.MULTIRUN:
        group = "_".join(Path(hc.sweep.dir).parts[-2:])
        sweep_dir = hc.sweep.dir
    return {
        "output_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "job_name": hc.job.override_dirname or "default",
        "group": group,
        "sweep_dir": sweep_dir,
        "job_num": hc.job.get("num"),
    }


@dataclass
class Run:
    """Where a run writes and how far it got (what ``results.json`` says if it stops)."""

    out: Path
    config: dict[str, Any]
    hydra: dict[str, Any]
    resumed: bool
    phase: str = "setup"
    epochs: dict[str, int] = field(default_factory=lambda: {"fp32": 0, "qat": 0})
    fp32_accuracy: float | None = None
    fp32_cache: str | None = None
    start: float = field(default_factory=time.perf_counter)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def last_ckpt(self, phase: str) -> Path:
        return self.ckpt_dir / phase / "last.ckpt"

    def status(self, status: str, **extra: Any) -> dict[str, Any]:
        """What is known now, as ``results.json`` holds it."""
        checkpoints = {p: c for p in ("fp32", "qat") if (c := self.last_ckpt(p)).is_file()}
        return {
            "status": status,
            "phase": self.phase,
            "epochs": dict(self.epochs),
            "fp32_accuracy": self.fp32_accuracy,
            "fp32_cache": self.fp32_cache,
            **extra,
            "checkpoints": {p: str(c) for p, c in checkpoints.items()},
            "resume": f"qat-train resume={self.out}",
            "resumed": self.resumed,
            "wall_time_s": round(time.perf_counter() - self.start, 2),
            "output_dir": str(self.out),
            "overrides": self.hydra.get("overrides", []),
            "sweep_group": self.hydra.get("group"),
            "job_num": self.hydra.get("job_num"),
            "config": self.config,
        }


def start_run(cfg: DictConfig) -> Run:
    """The run directory (``resume``'s, ``output_dir`` or Hydra's), checked against a resumed
    run's config; ``results.json`` says ``running`` from here on."""
    hydra_run_ = hydra_run()
    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.resume:
        out = Path(cfg.resume)
        previous = out / "results.json"
        if not previous.is_file():
            raise invalid("resume", cfg.resume, "a qat-train run directory (with results.json)")
        before = json.loads(previous.read_text())
        if before.get("status") == "completed":
            raise invalid("resume", cfg.resume, "an unfinished run (that one completed)")
        for key in sorted(set(config) | set(before.get("config", {}))):
            if key not in _RESUME_FREE and config.get(key) != before["config"].get(key):
                raise ConfigError(
                    f"resume={cfg.resume} is invalid with this config: {key} differs from the "
                    f"run's ({before['config'].get(key)!r}); allowed the run's own overrides "
                    f"{before.get('overrides', [])}"
                )
        log.info("resuming %s (%s in %s)", out, before.get("status"), before.get("phase"))
    else:
        out = Path(
            cfg.output_dir
            or hydra_run_.get("output_dir")
            or time.strftime("outputs/%Y-%m-%d/%H-%M-%S")
        )
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out=out, config=config, hydra=hydra_run_, resumed=bool(cfg.resume))
    write_json(out / "results.json", run.status("running"))
    return run


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (a reader never sees half a file)."""
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temp, path)
