"""``Trainer.fit(torch.compile(module))`` with `QATCallback`: Lightning unwraps the compiled
module and compiles its steps; the swap in ``configure_model`` happens before the first
compiled step, so the compiled code runs the quantized layers. The fit trains as an eager
fit does, validates with the integer model, and exports an ONNX that computes what the
integer model computes."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_modules import ImageClassifier, image_data, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

from qat_lightning import QATCallback
from qat_lightning.export import OnnxModel, convert
from qat_lightning.nn import QuantModule

pytestmark = pytest.mark.slow  # compiling on two CPU cores: about 30 s


class TinyClassifier(ImageClassifier):
    """A conv + BN (fused in QAT) + linear on 8x8 images."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 10),
        )
        super().__init__(backbone=backbone, n=32, batch_size=8)

    def train_dataloader(self):
        return DataLoader(image_data(self.n, size=8), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(image_data(8, size=8, seed=1), batch_size=self.batch_size)


def _fit(tmp_path, model, name: str) -> tuple[pl.Trainer, QATCallback]:
    callback = QATCallback(
        calibration_batches=2, export_formats=["onnx"], export_dir=tmp_path / name
    )
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path / name,
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=1,
            callbacks=[callback],
        )
    )
    trainer.fit(model)
    return trainer, callback


def test_a_compiled_lightning_module_trains_validates_and_exports_like_eager(
    tmp_path,
) -> None:
    eager = TinyClassifier()
    _fit(tmp_path, eager, "eager")
    module = TinyClassifier()
    compiled = torch.compile(module)
    # no recompilation storm (it ran into dynamo's recompile limit, then eager, for minutes
    # on a real model): quantized layers run eagerly inside the compiled steps
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        trainer, callback = _fit(tmp_path, compiled, "compiled")

    # Lightning compiled the steps of the module the wrapper holds, and that module was
    # quantized before the first compiled step ran
    assert compiled._orig_mod is module and module._compiler_ctx is not None
    assert isinstance(module.net[0], QuantModule) and isinstance(module.net[5], QuantModule)

    # the same training as eager: BN statistics, encodings and weights, up to the
    # compiler's float reassociation in the float code around the quantized layers
    for (name, p), q in zip(module.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)

    # validation inside the compiled fit ran the integer model (integer_eval=True)
    x, y = image_data(8, size=8, seed=1).tensors
    module.eval()
    with torch.no_grad():
        integer = module.net(x)  # eager, eval mode: the integer simulation
        assert torch.equal(convert(module)(x), integer)  # convert drops the compiled steps
    expected = F.cross_entropy(integer, y)
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(expected.item(), abs=1e-6)

    # the exported ONNX computes what the integer model computes
    onnx = OnnxModel(callback.export_paths["onnx"])(x)
    assert torch.equal(onnx.argmax(1), integer.argmax(1))
    torch.testing.assert_close(onnx, integer, rtol=0, atol=1e-6)
