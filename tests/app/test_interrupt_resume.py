"""An interrupted ``qat-train`` run keeps its progress and ``resume=<run dir>`` finishes it."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
from app_helpers import TINY, compose_config
from omegaconf import OmegaConf

from qat_lightning.app.train import train
from qat_lightning.app.validation import ConfigError
from qat_lightning.callback import QATCallback

RUN = [*TINY, "fp32_epochs=1", "qat_epochs=2"]


class Interrupt(pl.Callback):
    """Ctrl-C (or ``error``) at the start of QAT epoch ``epoch``."""

    def __init__(self, epoch: int, error: BaseException | None = None) -> None:
        self.epoch, self.error = epoch, error

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qat = any(isinstance(c, QATCallback) for c in trainer.callbacks)
        if qat and trainer.current_epoch == self.epoch:
            raise self.error or KeyboardInterrupt


class Epochs(pl.Callback):
    """The QAT epochs that ran."""

    def __init__(self) -> None:
        self.qat: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(c, QATCallback) for c in trainer.callbacks):
            self.qat.append(trainer.current_epoch)


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, caplog):
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C shutdown
        train(compose_config([*RUN, f"output_dir={run_dir}"]), callbacks=[Interrupt(1)])
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again afterwards
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["phase"] == "qat"
    assert stopped["epochs"] == {"fp32": 1, "qat": 1}
    assert stopped["fp32_accuracy"] is not None
    assert Path(stopped["checkpoints"]["qat"]) == run_dir / "checkpoints" / "qat" / "last.ckpt"
    assert (run_dir / "checkpoints" / "qat" / "last.ckpt").is_file()
    assert stopped["config"]["qat_epochs"] == 2
    # nothing exported (the directory itself was created when its writability was checked)
    assert not any((run_dir / "export").glob("*"))

    epochs = Epochs()
    with caplog.at_level(logging.INFO, logger="qat_lightning"):
        resumed = train(compose_config([*RUN, f"resume={run_dir}"]), callbacks=[epochs])
    messages = [r.getMessage() for r in caplog.records]
    assert "fp32: finished before, loaded " + str(run_dir / "checkpoints" / "fp32.pt") in messages
    assert not any(m.startswith("float phase:") for m in messages)  # not trained again
    assert epochs.qat == [1]  # only the unfinished QAT epoch ran: the checkpoint was restored
    assert resumed["status"] == "completed" and resumed["resumed"]
    assert resumed["epochs"] == {"fp32": 1, "qat": 2}
    assert resumed["output_dir"] == str(run_dir)
    assert Path(resumed["export_paths"]["onnx"]).is_file() and resumed["agreement"] == 1.0
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"

    uninterrupted = train(compose_config([*RUN, f"output_dir={tmp_path / 'whole'}"]))
    assert resumed["fp32_accuracy"] == uninterrupted["fp32_accuracy"]
    assert resumed["epochs"] == uninterrupted["epochs"]


@pytest.mark.slow
def test_a_crash_leaves_failed_with_the_error_line(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(
            compose_config([*RUN, f"output_dir={tmp_path}"]),
            callbacks=[Interrupt(0, RuntimeError("disk on fire\nsecond line"))],
        )
    failed = json.loads((tmp_path / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: disk on fire"
    assert failed["phase"] == "qat" and failed["epochs"]["fp32"] == 1


def write_run(path: Path, status: str, overrides: list[str]) -> None:
    config = OmegaConf.to_container(compose_config(overrides), resolve=True)
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"status": status, "config": config}))


def test_resume_refuses_another_config_or_a_completed_run(tmp_path):
    write_run(tmp_path / "stopped", "interrupted", RUN)
    cfg = compose_config([*RUN, "quant.params.bits=4", f"resume={tmp_path / 'stopped'}"])
    with pytest.raises(ConfigError, match=r"^resume=.* is invalid with this config: quant differs"):
        train(cfg)
    write_run(tmp_path / "done", "completed", RUN)
    with pytest.raises(ConfigError, match=r"^resume=.* is invalid: allowed an unfinished run"):
        train(compose_config([*RUN, f"resume={tmp_path / 'done'}"]))
