"""Run by test_ddp.py: 2-process CPU DDP (gloo) QAT; each rank saves its encodings."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from qat_lightning.callback import QATCallback
from qat_lightning.quant import Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_modules import ImageClassifier

out = Path(sys.argv[1])
pl.seed_everything(0)
model = ImageClassifier(n=64, batch_size=8)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    strategy="ddp",
    max_steps=3,
    limit_val_batches=0,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    default_root_dir=out,
    callbacks=[QATCallback(calibration_batches=2, export_dir=out / "export")],
)
trainer.fit(model)
encodings = {
    n: (m.scale.detach().clone(), m.zero_point.detach().clone())
    for n, m in model.named_modules()
    if isinstance(m, Quantizer)
}
torch.save(encodings, out / f"encodings_rank{trainer.global_rank}.pt")
