"""Misuse and faults end in a correct model or one clear error, never a silently wrong one."""

from __future__ import annotations

import logging
import re

import onnx
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning_modules import ImageClassifier

from qat_lightning.callback import QATCallback, QATExportError
from qat_lightning.export import convert, load_quantized
from qat_lightning.nn import QuantModule
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.surgery.config import DEFAULT_INPUTS, DEFAULT_PARAMS


def quantizers(module):
    return [m for m in module.modules() if isinstance(m, Quantizer)]


def onnx_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_partial_scheme_dicts_keep_the_documented_defaults(make_trainer, tmp_path):
    qat = QATCallback(params={"bits": 4}, inputs={"bits": 4}, export_formats=())
    assert qat.config.params == DEFAULT_PARAMS.replace(bits=4)
    assert qat.config.inputs == DEFAULT_INPUTS.replace(bits=4)
    model = ImageClassifier()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[qat]).fit(model)
    conv = model.net[0]
    weight = conv.param_quantizers["weight"].scheme
    assert (weight.bits, weight.per_channel, weight.symmetric) == (4, True, True)
    out = conv.output_quantizers[0].scheme
    assert (out.bits, out.signed, out.symmetric, out.observer) == (4, False, False, "moving_minmax")
    table = (tmp_path / "qat_report.txt").read_text()
    assert "params: 4-bit symmetric signed per_channel minmax" in table
    assert "inputs: 4-bit affine unsigned per_tensor moving_minmax" in table


@pytest.mark.parametrize("role", ["inputs", "params"])
def test_none_keeps_that_role_float_through_training_and_export(make_trainer, tmp_path, role):
    model = ImageClassifier()
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export", **{role: None})
    make_trainer(max_steps=2, limit_val_batches=1, callbacks=[qat]).fit(model)
    layers = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert layers
    for layer in layers:
        activations = [*layer.input_quantizers, *layer.output_quantizers]
        if role == "inputs":  # weight-only
            assert all(q is None for q in activations)
            assert layer.param_quantizers["weight"] is not None
        else:  # activation-only
            assert all(q is None for q in layer.param_quantizers.values())
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(convert(model)(x), expected)
    assert torch.allclose(onnx_run(qat.export_paths["onnx"], x), expected, atol=2e-2)
    ops = {n.op_type for n in onnx.load(str(qat.export_paths["onnx"])).graph.node}
    assert "DequantizeLinear" in ops
    assert ("QuantizeLinear" in ops) == (role == "params")  # weight-only: no activation Q
    reloaded = load_quantized(qat.export_paths["native"], ImageClassifier())
    assert torch.equal(reloaded(x), expected)


def test_one_callback_calibrates_a_second_model(make_trainer):
    qat = QATCallback(calibration_batches=1, export_formats=())
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[qat]).fit(ImageClassifier())
    second = ImageClassifier()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[qat]).fit(second)
    assert all(bool(q.initialized) for q in quantizers(second))
    assert qat.calibrated
    # an old callback state that says "calibrated" does not skip calibrating a fresh model
    old = QATCallback(calibration_batches=1, export_formats=())
    old.load_state_dict({"calibrated": True, "bn_frozen": True, "observers_frozen": True})
    third = ImageClassifier()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[old]).fit(third)
    assert all(bool(q.initialized) for q in quantizers(third))


def test_a_new_callback_on_a_quantized_model_must_match_it(make_trainer):
    model = ImageClassifier()
    make_trainer(max_steps=1, limit_val_batches=0, callbacks=[QATCallback(export_formats=())]).fit(
        model
    )
    other = QATCallback(params={"bits": 4}, export_formats=())
    with pytest.raises(ValueError, match=r"already quantized with another configuration.*s8"):
        make_trainer(max_steps=2, limit_val_batches=0, callbacks=[other]).fit(model)
    same = QATCallback(export_formats=())
    make_trainer(max_steps=2, limit_val_batches=0, callbacks=[same]).fit(model)
    assert model.net[0].param_quantizers["weight"].scheme.bits == 8


@pytest.mark.parametrize(
    "kwargs, length, end",
    [
        ({"quant_delay": {"epoch": 50}}, {"max_epochs": 2}, "max_epochs=2 .* at epoch 2"),
        ({"freeze_observers_at": {"step": 8}}, {"max_steps": 8}, "max_steps=8 end at step 8"),
        ({"freeze_bn_at": {"epoch": 2}}, {"max_steps": 8}, "max_steps=8 end at epoch 2"),
        ({"quant_delay": {"step": 9}}, {"max_epochs": 2}, "max_epochs=2 .* at step 8"),
    ],
)
def test_milestones_past_the_run_are_an_error(make_trainer, kwargs, length, end):
    ((name, value),) = kwargs.items()
    qat = QATCallback(calibration_batches=1, export_formats=(), **kwargs)
    trainer = make_trainer(limit_val_batches=0, callbacks=[qat], **length)  # 4 steps / epoch
    message = re.escape(f"QATCallback({name}={value}) is past the end of the run") + ".*" + end
    with pytest.raises(ValueError, match=message):
        trainer.fit(ImageClassifier())
    assert trainer.global_step == 0


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_a_fit_stopped_before_quant_delay_exports_nothing(make_trainer, tmp_path):
    qat = QATCallback(calibration_batches=1, quant_delay=1, export_dir=tmp_path / "export")
    trainer = make_trainer(
        max_epochs=3, limit_val_batches=0, callbacks=[qat, StopAfterFirstEpoch()]
    )
    with pytest.raises(QATExportError, match=r"fake quantization never ran.*quant_delay"):
        trainer.fit(ImageClassifier())
    assert list((tmp_path / "export").iterdir()) == [] and qat.export_paths == {}


def test_ddp_spawn_is_refused_naming_ddp(tmp_path):
    import lightning.pytorch as pl
    from lightning_modules import trainer_kwargs

    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=1, max_steps=1),
        callbacks=[QATCallback(export_formats=())],
    )
    with pytest.raises(Exception, match='allowed strategy="ddp"'):
        trainer.fit(ImageClassifier())


class CountSteps(Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        CountSteps.steps += 1


def test_unwritable_export_dir_fails_before_training(make_trainer, tmp_path):
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the export directory should be")
    qat = QATCallback(calibration_batches=1, export_dir=blocked / "export")
    counter = CountSteps()
    with pytest.raises(ValueError, match=r"QATCallback\(export_dir=.*not_a_dir.*not writable"):
        make_trainer(max_steps=2, limit_val_batches=0, callbacks=[qat, counter]).fit(
            ImageClassifier()
        )
    assert CountSteps.steps == 0


def test_a_failing_format_keeps_the_paths_already_written(make_trainer, tmp_path):
    qat = QATCallback(
        calibration_batches=1,
        export_dir=tmp_path / "export",
        export_formats=("native", "onnx"),
        example_input=torch.randn(2, 5),  # not an image: the ONNX trace fails
    )
    with pytest.raises(QATExportError, match=r"'onnx'.*native written"):
        make_trainer(max_steps=1, limit_val_batches=0, callbacks=[qat]).fit(ImageClassifier())
    assert list(qat.export_paths) == ["native"] and qat.export_paths["native"].exists()


def test_no_training_batches_warn_and_export_nothing(make_trainer, tmp_path):
    qat = QATCallback(export_dir=tmp_path / "export")
    with pytest.warns(UserWarning, match="never calibrated and is not exported"):
        make_trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, callbacks=[qat]).fit(
            ImageClassifier()
        )
    assert qat.export_paths == {}


class _DeadFirstLayer(ImageClassifier):
    """The first conv's weights are zero: its output (and the ReLU after it) is all zeros."""

    def configure_model(self):
        with torch.no_grad():
            self.net[0].weight.zero_()
            self.net[0].bias.zero_()
            self.net[1].bias.fill_(-10.0)  # BN shifts far below zero: the ReLU gives zeros


def test_calibration_on_all_zero_data_warns_naming_the_quantizers(make_trainer, tmp_path):
    qat = QATCallback(calibration_batches=2, export_formats=())
    with pytest.warns(UserWarning, match=r"calibrated on all-zero data \(net\.") as record:
        make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[qat]).fit(
            _DeadFirstLayer()
        )
    assert sum("all-zero data" in str(w.message) for w in record) == 1


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"export_dir": 5}, "QATCallback(export_dir=5) is invalid"),
        ({"skip": 5}, "QATCallback(skip=5) is invalid"),
        ({"overrides": ["fc"]}, "QATCallback(overrides=['fc']) is invalid"),
        ({"inputs": None, "params": None}, "QATCallback(inputs=None, params=None) is invalid"),
        ({"inputs": 8}, "inputs=8 is invalid"),
    ],
)
def test_argument_errors_are_one_line_value_errors(kwargs, shown):
    with pytest.raises(ValueError) as caught:
        QATCallback(**kwargs)
    assert shown in str(caught.value) and "\n" not in str(caught.value)


def test_fit_end_prints_one_summary_line(make_trainer, tmp_path, caplog):
    qat = QATCallback(calibration_batches=1, export_dir=tmp_path / "export")
    with caplog.at_level(logging.INFO):
        make_trainer(max_epochs=1, limit_val_batches=1, callbacks=[qat]).fit(ImageClassifier())
    lines = [r.getMessage() for r in caplog.records if "QATCallback: done" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "last validation (integer model): val_loss=" in lines[0]
    for fmt, path in qat.export_paths.items():
        assert f"{fmt} {path} (" in lines[0] and "KiB)" in lines[0]


def test_scheme_objects_are_taken_as_given():
    scheme = QuantScheme(bits=6)  # per tensor: an explicit scheme is not merged
    assert QATCallback(params=scheme).config.params == scheme


def test_hydra_lists_and_dicts_are_accepted():
    from omegaconf import OmegaConf

    qat = QATCallback(
        skip=OmegaConf.create(["fc"]),
        params=OmegaConf.create({"bits": 4}),
        overrides=OmegaConf.create({"net.0": {"params": {"bits": 8}}}),
    )
    assert qat.config.skip == ("fc",) and qat.config.params == DEFAULT_PARAMS.replace(bits=4)
    assert qat.config.schemes_for("net.0")[1] == DEFAULT_PARAMS
