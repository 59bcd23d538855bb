"""QATCallback on LightningModules we did not write: swap, calibrate, train, export."""

from __future__ import annotations

import lightning.pytorch as pl
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_modules import ConfigureModelClassifier, ImageClassifier

from qat_lightning.callback import QATCallback, QATExportError
from qat_lightning.export import convert, load_quantized
from qat_lightning.nn import QuantModule, fake_quant_eval
from qat_lightning.quant import Quantizer


def quantizers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, Quantizer)}


def model_state(module) -> dict[str, torch.Tensor]:
    """Parameters and non-quantizer buffers (what calibration must not touch)."""
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    for name, buf in module.named_buffers():
        if "quantizers." not in name:
            state[f"buffer:{name}"] = buf.clone()
    return state


class CalibrationProbe(Callback):
    """Snapshots the model before calibration (fit start) and after it (train start), then
    stops: it sits after QATCallback, whose on_train_start calibrates."""

    def on_fit_start(self, trainer, pl_module):
        self.before = model_state(pl_module)

    def on_train_start(self, trainer, pl_module):
        self.after = model_state(pl_module)
        self.encodings = {n: bool(q.initialized) for n, q in quantizers(pl_module).items()}
        trainer.should_stop = True


def test_boring_model_trains_and_exports(make_trainer, tmp_path):
    model = BoringModel()
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export")
    make_trainer(max_steps=4, limit_val_batches=1, callbacks=[qat]).fit(model)
    assert isinstance(model.layer, QuantModule) and isinstance(model.layer, torch.nn.Linear)
    assert qat.calibrated
    onnx_path = qat.export_paths["onnx"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model.eval()
    ref = model(x).detach()
    lsb = model.layer.output_quantizers[0].scale
    assert ((torch.from_numpy(out) - ref).abs() <= lsb * 1.01).float().mean() >= 0.99
    assert (qat.export_paths["native"] / "encodings.json").exists()
    # the native artifact rebuilds from a fresh float model and gives the integer outputs
    reloaded = load_quantized(qat.export_paths["native"], BoringModel())
    assert torch.equal(reloaded(x), convert(model)(x))


@pytest.mark.parametrize(
    "module_factory",
    [
        lambda: ImageClassifier(),
        lambda: ConfigureModelClassifier(),
    ],
    ids=["setup-built", "configure_model-built"],
)
def test_calibration_changes_nothing_but_encodings(module_factory, make_trainer):
    model = module_factory()
    probe = CalibrationProbe()
    make_trainer(max_epochs=1, callbacks=[QATCallback(calibration_batches=3), probe]).fit(model)
    assert probe.before.keys() == probe.after.keys()
    changed = [k for k in probe.before if not torch.equal(probe.before[k], probe.after[k])]
    assert changed == []
    assert probe.encodings and all(probe.encodings.values()), probe.encodings
    # every conv/linear was swapped; BN was fused away
    assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in model.modules())


def test_resnet18_classifier_fits(make_trainer, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = ImageClassifier(torchvision.models.resnet18(num_classes=10), n=32, batch_size=8)
    qat = QATCallback(
        calibration_batches=2, export_formats=("native",), export_dir=tmp_path / "export"
    )
    make_trainer(max_steps=2, limit_val_batches=0, callbacks=[qat]).fit(model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, QuantModule) for m in convs)
    assert qat.calibrated and qat.export_paths["native"].exists()


def test_a_backbone_kept_in_eval_mode_is_calibrated_whole_and_stays_in_eval(make_trainer, tmp_path):
    # Fine-tuning with frozen BatchNorm statistics: the user keeps the backbone in eval mode.
    # Calibration must observe every layer anyway (residual adds included), and nothing the
    # callback does (calibration, export) may put the backbone back in train mode.
    torchvision = pytest.importorskip("torchvision")
    model = ImageClassifier(torchvision.models.resnet18(num_classes=10), n=32, batch_size=8)
    model.net.eval()
    qat = QATCallback(
        calibration_batches=2, export_formats=("native",), export_dir=tmp_path / "export"
    )
    make_trainer(max_steps=2, limit_val_batches=0, callbacks=[qat]).fit(model)
    adds = [m for m in model.modules() if type(m).__name__ == "QuantAdd"]
    assert len(adds) == 8  # resnet18's residual adds: none reverted to float
    assert all(q.is_initialized for m in adds for q in m.quantizers())
    assert not [
        row.name
        for row in qat.report.rows
        if row.status == "float" and row.note and "observed nothing" in row.note
    ]
    assert qat.export_paths["native"].exists()
    assert not [n for n, m in model.net.named_modules() if m.training]


def test_optimizer_sees_quantized_model_and_learnable_scales(make_trainer):
    model = ImageClassifier()
    qat = QATCallback(
        params={"bits": 4, "granularity": "per_channel", "learnable": True},
        calibration_batches=1,
        export_formats=(),
    )
    make_trainer(max_steps=3, limit_val_batches=0, callbacks=[qat]).fit(model)
    optimizer = model.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    scales = [q.scale for q in quantizers(model).values() if q.scheme.learnable]
    assert scales and all(id(s) in in_optimizer for s in scales)
    assert any(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)


def test_fit_twice_then_test_best_and_validate_before_fit(make_trainer, tmp_path):
    model = ImageClassifier()
    qat = QATCallback(calibration_batches=2, export_formats=())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = make_trainer(
        max_epochs=1, limit_val_batches=1, callbacks=[qat, ckpt], enable_checkpointing=True
    )
    trainer.validate(model)  # before fit: float behaviour, no crash, no observation
    assert all(not q.initialized for q in quantizers(model).values())
    trainer.fit(model)
    n_quantizers = len(quantizers(model))
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model)  # fitting twice: no double wrap, no recalibration
    assert len(quantizers(model)) == n_quantizers
    results = trainer.test(model, ckpt_path="best")
    assert "test_acc" in results[0]


def test_checkpoint_reloads_into_fresh_model(make_trainer, tmp_path):
    model = ImageClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[QATCallback(calibration_batches=2, export_formats=()), ckpt],
    ).fit(model)
    path = tmp_path / "ckpt" / "last.ckpt"
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)

    fresh = ImageClassifier()
    trainer = make_trainer(callbacks=[QATCallback(export_formats=())])
    trainer.test(fresh, ckpt_path=path)
    fresh.eval()
    assert torch.equal(fresh(x), expected)

    resumed = ImageClassifier()
    qat = QATCallback(calibration_batches=2, export_formats=())
    make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[qat]).fit(resumed, ckpt_path=path)
    assert qat.calibrated


def test_calibration_batches_beyond_loader_warns(make_trainer):
    model = ImageClassifier(n=32, batch_size=16)  # 2 batches
    with pytest.warns(UserWarning, match="calibrated on the 2 batches"):
        make_trainer(
            max_steps=1,
            limit_val_batches=0,
            callbacks=[QATCallback(calibration_batches=50, export_formats=())],
        ).fit(model)


def test_schedule_in_the_past_is_an_error(make_trainer, tmp_path):
    model = ImageClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = QATCallback(calibration_batches=1, export_formats=())  # BN never frozen
    make_trainer(
        max_epochs=3, limit_val_batches=0, enable_checkpointing=True, callbacks=[first, ckpt]
    ).fit(model)
    # Resumed at epoch 3 with a BN freeze at epoch 1 that never happened: say so, don't guess.
    with pytest.raises(ValueError, match=r"freeze_bn_at=.*is in the past"):
        make_trainer(
            max_epochs=5,
            limit_val_batches=0,
            callbacks=[QATCallback(freeze_bn_at={"epoch": 1}, export_formats=())],
        ).fit(ImageClassifier(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_export_failure_keeps_checkpoints_and_says_why(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # an example input the model cannot take: the ONNX trace fails after training
    qat = QATCallback(
        calibration_batches=1, export_dir=tmp_path / "export", example_input=torch.randn(2, 5)
    )
    with pytest.raises(QATExportError, match="checkpoints are intact"):
        make_trainer(
            max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[qat, ckpt]
        ).fit(ImageClassifier())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert any("quantizers" in k for k in state["state_dict"])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"freeze_bn_at": {"epochs": 3}}, "freeze_bn_at"),
        ({"freeze_observers_at": -1}, "freeze_observers_at"),
        ({"quant_delay": {"step": 1.5}}, "quant_delay"),
        ({"export_formats": ["tflite"]}, "export_formats"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"params": {"bits": 1}}, "bits"),
        ({"inputs": {"observer": "magic"}}, "observer"),
        ({"example_input": [1, 2]}, "example_input"),
        ({"integer_eval": "yes"}, "integer_eval"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QATCallback(**kwargs)


def test_grad_accumulation_and_bf16_mixed_export(make_trainer, tmp_path):
    model = ImageClassifier()
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export")
    make_trainer(
        max_steps=2,
        limit_val_batches=0,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        callbacks=[qat],
    ).fit(model)
    assert qat.export_paths["onnx"].exists()


def test_logs_layer_health_through_any_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = ImageClassifier()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        callbacks=[QATCallback(calibration_batches=1, log_every_n_steps=1, export_formats=())],
    )
    trainer.fit(model)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    for figure in ("scale", "zero_point", "clip_rate", "sqnr_db"):
        assert f"/{figure}" in header
    assert (tmp_path / "lightning_logs" / "version_0" / "qat_report.txt").exists()


@pytest.mark.slow
def test_exported_onnx_from_a_real_fit_agrees_with_the_trained_model(make_trainer, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(n=128, batch_size=32)
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export")
    make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[qat]).fit(model)
    session = ort.InferenceSession(
        str(qat.export_paths["onnx"]), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    onnx_out = torch.from_numpy(onnx_out)
    model.eval()
    with torch.no_grad():
        integer, fake = convert(model)(x), model(x)
    # against the integer simulation: the same codes, on any x86 CPU (VNNI or not, see
    # IntegerLayer._needs_unsigned_weights)
    assert torch.equal(onnx_out, integer)
    # against the fake-quant model that was trained
    assert (onnx_out.argmax(1) == fake.argmax(1)).float().mean() >= 0.99


@pytest.mark.parametrize("integer_eval", [True, False], ids=["integer_eval", "fake_quant"])
def test_validation_runs_the_integer_model_unless_told_otherwise(
    make_trainer, monkeypatch, integer_eval
):
    model = ImageClassifier()
    qat = QATCallback(calibration_batches=2, integer_eval=integer_eval, export_formats=())
    trainer = make_trainer(max_steps=3, limit_val_batches=1, callbacks=[qat])
    trainer.fit(model)
    seen, integer_calls = [], []
    original = QuantModule.integer_forward

    def counting(self, *args, **kwargs):
        integer_calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QuantModule, "integer_forward", counting)
    handle = model.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    trainer.validate(model, verbose=False)
    handle.remove()
    monkeypatch.undo()
    assert bool(integer_calls) == integer_eval
    x, out = seen[0]
    model.eval()
    with torch.no_grad():
        with fake_quant_eval():
            fake = model(x)
        expected = convert(model)(x) if integer_eval else fake
    assert torch.equal(out, expected)
