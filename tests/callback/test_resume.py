"""Resume exactness: an interrupted, resumed QAT run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_modules import ImageClassifier, trainer_kwargs

from qat_lightning.callback import QATCallback


def run(tmp_path, ckpt_dir=None, ckpt_path=None) -> ImageClassifier:
    pl.seed_everything(0)
    model = ImageClassifier(n=48, batch_size=16)
    callbacks = [
        QATCallback(
            calibration_batches=2,
            freeze_bn_at={"epoch": 1},
            freeze_observers_at={"epoch": 2},
            export_formats=(),
        )
    ]
    if ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        )
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=4,
            limit_val_batches=0,
            callbacks=callbacks,
            enable_checkpointing=ckpt_dir is not None,
        )
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "resume_after_epoch", [0, 2], ids=["before-observer-freeze", "after-observer-freeze"]
)
def test_resume_is_bit_exact(tmp_path, resume_after_epoch):
    full = run(tmp_path / "full", ckpt_dir=tmp_path / "ckpt")
    resumed = run(
        tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / f"epoch={resume_after_epoch}.ckpt"
    )
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert any("scale" in k for k in got)
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert differ == []
