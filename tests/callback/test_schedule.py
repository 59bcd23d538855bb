"""The schedules act in a real fit: BN statistics, encodings and fake quant, per batch."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning_modules import ImageClassifier

from qat_lightning.callback import QATCallback

STEPS_PER_EPOCH = 4  # ImageClassifier(n=64, batch_size=16)


class Recorder(Callback):
    """After QATCallback in the list: what each training step saw and changed."""

    def on_train_start(self, trainer, pl_module):
        self.rows = []
        conv = pl_module.net[0]  # the fused Conv+BN+ReLU
        self.bn = conv.bn
        self.act = conv.output_quantizers[0]
        self.passed_through = []
        head = pl_module.net[-1].output_quantizers[0]
        head.register_forward_hook(
            lambda m, args, out: self.passed_through.append(torch.equal(args[0], out))
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        self.before = (self.bn.running_mean.clone(), self.act.scale.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bn_moved = not torch.equal(self.before[0], self.bn.running_mean)
        scale_moved = not torch.equal(self.before[1], self.act.scale)
        self.rows.append((self.step, bn_moved, scale_moved, self.passed_through[-1]))


@pytest.mark.parametrize(
    "unit, bn_at, observers_at, delay, length",
    [
        ("epoch", 1, 2, 1, {"max_epochs": 3}),
        ("step", 3, 7, 2, {"max_steps": 10}),
    ],
)
def test_schedules_act_at_their_milestones(make_trainer, unit, bn_at, observers_at, delay, length):
    recorder = Recorder()
    qat = QATCallback(
        calibration_batches=1,
        freeze_bn_at={unit: bn_at},
        freeze_observers_at={unit: observers_at},
        quant_delay={unit: delay},
        export_formats=(),
    )
    make_trainer(limit_val_batches=0, callbacks=[qat, recorder], **length).fit(
        ImageClassifier(n=64, batch_size=16)
    )
    per = STEPS_PER_EPOCH if unit == "epoch" else 1
    bn_step, observer_step, delay_step = bn_at * per, observers_at * per, delay * per
    assert len(recorder.rows) == (length.get("max_epochs", 0) * STEPS_PER_EPOCH or 10)
    for step, bn_moved, scale_moved, passed_through in recorder.rows:
        # fake quant is off (the quantizer passes values through) until quant_delay
        assert passed_through == (step < delay_step), step
        # BatchNorm statistics move until freeze_bn_at, then never again
        assert bn_moved == (step < bn_step), step
        # encodings move once fake quant runs, until the observers freeze
        assert scale_moved == (delay_step <= step < observer_step), step
