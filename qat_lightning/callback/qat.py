"""`QATCallback`: quantization-aware training on an existing Lightning `Trainer`, one callback.

When things happen, and why there:

- **Swap** right after the LightningModule's own ``setup`` / ``configure_model`` (so models built
  there are covered), and before checkpoint restore, ``configure_optimizers`` and DDP wrapping:
  the optimizer then sees learnable scales, DDP wraps the quantized model, and a checkpoint's
  quantizer state loads into modules that exist. This runs for every stage, so
  ``trainer.test(model, ckpt_path=...)`` on a fresh model loads a QAT checkpoint. Lightning
  calls ``configure_model`` after all ``setup`` hooks, so the callback chains onto that hook
  of the module instance (and restores it at teardown).
- **Calibrate** at ``on_train_start`` (`callback.calibration`) on the first
  ``calibration_batches`` batches of the train loader: observers on, fake quant off, no
  gradient, BN buffers restored after each batch. No optimizer step happens, so nothing in the
  model changes except the observers. Whether a model is calibrated is read from its
  quantizers' ``initialized`` buffers, never kept here: one callback on a second model
  calibrates it, a resumed checkpoint is not recalibrated.
- **Schedule** BN freeze, observer freeze and quant delay at epoch or step milestones.
- **Export** at ``on_fit_end`` on global rank 0 (``export_dir`` is checked writable at fit
  start), then one summary line: last validation metrics, export paths and sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from qat_lightning.callback import arguments
from qat_lightning.callback.calibration import is_quantized, observe_batches, start_fake_quant
from qat_lightning.callback.evaluation import EvaluationHooks
from qat_lightning.callback.exporting import QATExportError, export_trained
from qat_lightning.callback.health import HealthProbe, named_quantizers
from qat_lightning.callback.progress import (
    bn_frozen,
    check_milestone_in_run,
    check_same_config,
    fake_quant_ran,
    is_calibrated,
    observers_running,
    refuse_multiprocessing,
)
from qat_lightning.callback.reporting import (
    check_writable,
    log_dir,
    log_report,
    summary,
    validation_metrics,
)
from qat_lightning.callback.schedule import Milestone, apply_schedule
from qat_lightning.export.example_input import ExampleInput
from qat_lightning.quant import QuantScheme
from qat_lightning.surgery import quantize_model
from qat_lightning.surgery.config import DEFAULT_INPUTS, DEFAULT_PARAMS

EXPORT_FORMATS = ("onnx", "native")


class QATCallback(EvaluationHooks, Callback):
    """Quantization-aware training for an unchanged LightningModule.

    Args:
        inputs: scheme for activations: a `QuantScheme`, or a dict of its fields applied field
            by field over the default (``{"bits": 4}``: 4-bit affine unsigned, moving
            min/max); ``None`` keeps activations float (weight-only quantization, through
            training, integer eval, `convert`, ONNX and the native artifact). Default
            (`DEFAULT_INPUTS`): 8-bit affine unsigned, moving min/max.
        params: scheme for weights, likewise (``{"bits": 4}``: 4-bit symmetric per-channel,
            min/max); ``None`` keeps weights float (activation-only). Default
            (`DEFAULT_PARAMS`): 8-bit symmetric per-channel, min/max. ``inputs`` and
            ``params`` both None is an error.
        calibration_batches: training batches observed before QAT starts (>= 1).
        freeze_bn_at: when BatchNorm statistics freeze, e.g. ``{"epoch": 3}`` (at the start
            of epoch 3) or ``{"step": 500}`` (before optimizer step 500); a bare int is an
            epoch; ``None``: never. A milestone at or past the run's end (``max_epochs`` /
            ``max_steps``) is an error at fit start.
        freeze_observers_at: when observers freeze (encodings stop moving); ``None``: never.
        quant_delay: train in float until then, observers still running; ``None``: no delay.
            A fit that stops before it (EarlyStopping) exports nothing: `QATExportError`.
        overrides: per-name scheme overrides for `quantize_model`, e.g.
            ``{"fc": {"params": {"bits": 8}}}``; each dict merges field by field over the
            scheme the layer would have without it. A pattern matching nothing warns.
        skip: glob patterns of module names left float, e.g. ``["fc", "*.downsample.*"]``.
        export_dir: where ``on_fit_end`` writes the integer model; default
            ``<trainer.log_dir>/qat_export``. Checked for writing at fit start.
        export_formats: any of ``"onnx"`` and ``"native"`` (safetensors + encodings JSON).
        example_input: the arguments of ``forward`` for the ONNX export: a tensor, a tuple
            (positional), a dict (keyword: ``{"input_ids": ids, "attention_mask": mask}``) or
            an `ExampleInput` (both); see `export_onnx`. Default: the arguments of the first
            forward call in calibration (2 rows of each batched tensor), kept in the
            callback's state, so a resumed fit exports the same.
        log_every_n_steps: how often per-layer scale, zero point, clip rate and SQNR are logged.
        fuse: fuse Conv/Linear + BatchNorm (+ReLU) into QAT-folded modules.
        integer_eval: validation, test and predict run the integer simulation, the exported
            model's integer arithmetic (a little slower than fake quant: 1.72x a
            float forward against 1.47x on resnet18 on a CPU); ``False``: float32 fake
            quant, the training arithmetic.

    Example:
        >>> trainer = Trainer(max_epochs=3, callbacks=[QATCallback(params={"bits": 4})])
        >>> trainer.fit(model, datamodule=dm)   # exports to <log_dir>/qat_export at the end
    """

    def __init__(
        self,
        inputs: QuantScheme | dict[str, Any] | None = DEFAULT_INPUTS,
        params: QuantScheme | dict[str, Any] | None = DEFAULT_PARAMS,
        calibration_batches: int = 8,
        freeze_bn_at: int | dict[str, int] | None = None,
        freeze_observers_at: int | dict[str, int] | None = None,
        quant_delay: int | dict[str, int] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        skip: Sequence[str] = (),
        export_dir: str | Path | None = None,
        export_formats: Sequence[str] = EXPORT_FORMATS,
        example_input: torch.Tensor | tuple | dict[str, Any] | ExampleInput | None = None,
        log_every_n_steps: int = 50,
        fuse: bool = True,
        integer_eval: bool = True,
    ) -> None:
        self.config = arguments.quant_config(inputs, params, overrides, skip, fuse)
        self.calibration_batches = arguments.positive_int(
            "calibration_batches", calibration_batches
        )
        self.freeze_bn_at = Milestone.parse("freeze_bn_at", freeze_bn_at)
        self.freeze_observers_at = Milestone.parse("freeze_observers_at", freeze_observers_at)
        self.quant_delay = Milestone.parse("quant_delay", quant_delay)
        self.export_formats = arguments.export_formats(export_formats, EXPORT_FORMATS)
        self.export_dir = arguments.export_dir(export_dir)
        self.example_input = arguments.example_input(example_input)
        self._captured_input = False  # example_input came from a batch, not from the user
        self._capture_refused: str | None = None  # why the forward's arguments were not kept
        self.log_every_n_steps = arguments.positive_int("log_every_n_steps", log_every_n_steps)
        if not isinstance(integer_eval, bool):
            raise ValueError(
                f"QATCallback(integer_eval={integer_eval!r}) is invalid: allowed True or False"
            )
        self.integer_eval = integer_eval
        # Progress is the model's (see `calibrated`); these only say what was logged already.
        self._announced: set[str] = set()
        self._model: pl.LightningModule | None = None
        self._qat_running = False
        self.report = None
        self.export_paths: dict[str, Path] = {}
        self._export_target: str | None = None  # "" = the LightningModule, else a child name
        self._chained: tuple[pl.LightningModule, Any] | None = None
        self._probe: HealthProbe | None = None
        self._last_logged_step = -1
        EvaluationHooks.__init__(self)

    @property
    def calibrated(self) -> bool:
        """Whether the model this callback last saw is calibrated (read from its quantizers'
        ``initialized`` buffers: a fresh model is not, a resumed checkpoint is)."""
        return self._model is not None and is_calibrated(self._model)

    # -- swap ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_multiprocessing(trainer)
        if self._model is not pl_module:
            self._model = pl_module
            self._announced.clear()
            if self._captured_input:  # captured from another model's batches
                self.example_input, self._export_target, self._captured_input = None, None, False
        if is_quantized(pl_module):
            check_same_config(pl_module, self.config)
            return
        # Chain onto this instance's configure_model: Lightning calls it after every setup hook
        # and before restore / optimizers / DDP. No functools.wraps: Lightning must see it as
        # overridden even when the user did not define configure_model.
        original = pl_module.configure_model

        def configure_model_then_quantize() -> None:
            original()
            self._quantize(pl_module)

        pl_module.configure_model = configure_model_then_quantize
        self._chained = (pl_module, original)

    def _quantize(self, pl_module: pl.LightningModule) -> None:
        if is_quantized(pl_module):
            return
        self.report = quantize_model(pl_module, self.config)
        # Float behaviour until calibration: a sanity-check validation must neither see
        # uncalibrated fake quant nor feed the observers.
        for _, quantizer in named_quantizers(pl_module):
            quantizer.enable_observer(False).enable_fake_quant(False)
        rank_zero_info(f"QATCallback: quantized the model\n{self.report}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._chained is not None:
            module, _ = self._chained
            module.__dict__.pop("configure_model", None)
            self._chained = None

    # -- fit start: report, schedule checks, calibration ------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logs = log_dir(trainer)  # a collective under DDP: every rank must ask
        if self.export_formats and trainer.is_global_zero:
            check_writable(self.export_dir or logs / "qat_export", self.export_dir)
        if self.report is not None and trainer.is_global_zero:
            log_report(trainer, self.report, logs)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in ("freeze_bn_at", "freeze_observers_at", "quant_delay"):
            milestone = getattr(self, name)
            if milestone is not None:
                check_milestone_in_run(name, milestone, trainer)
        self._check_schedule_not_past(trainer, pl_module)
        if not is_calibrated(pl_module):
            self._calibrate(trainer, pl_module)
        self._qat_running = is_calibrated(pl_module)  # read once per fit: a device sync each
        self._apply_schedule(trainer, pl_module)

    def _check_schedule_not_past(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        calibrated = is_calibrated(pl_module)
        done = {  # whether the model (a resumed one) shows the milestone applied already
            "freeze_bn_at": calibrated and bn_frozen(pl_module) is not False,
            "freeze_observers_at": calibrated and not observers_running(pl_module),
            "quant_delay": calibrated,
        }
        for name, done_already in done.items():
            milestone: Milestone | None = getattr(self, name)
            if milestone is None or done_already:
                continue
            now = trainer.current_epoch if milestone.unit == "epoch" else trainer.global_step
            if now > milestone.value:
                raise ValueError(
                    f"QATCallback({name}={milestone}) is in the past: QAT starts at "
                    f"{milestone.unit} {now}; allowed a {milestone.unit} >= {now}"
                )

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = observe_batches(
            trainer, pl_module, self.calibration_batches, capture=self.example_input is None
        )
        if run.captured is not None:
            self.example_input, self._export_target, self._capture_refused = run.captured
            self._captured_input = self.example_input is not None
        start_fake_quant(trainer, pl_module, run, self.calibration_batches, self.report)

    # -- schedule --------------------------------------------------------------------------
    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._qat_running:
            return  # nothing was calibrated (empty loader): the model stays float
        apply_schedule(
            pl_module,
            trainer.current_epoch,
            trainer.global_step,
            (self.freeze_bn_at, self.freeze_observers_at, self.quant_delay),
            self._announced,
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_schedule(trainer, pl_module)
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._probe = HealthProbe(pl_module).attach()
            self._last_logged_step = step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._probe is None:
            return
        metrics = self._probe.detach()
        self._probe = None
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- export ------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out_dir = self.export_dir or log_dir(trainer) / "qat_export"  # every rank asks
        if not trainer.is_global_zero or not self.export_formats:
            return
        if not is_calibrated(pl_module):
            rank_zero_warn(
                "QATCallback: no training batch ran (limit_train_batches=0, an empty train "
                "loader, or a fit that stopped first): the model was never calibrated and is "
                f"not exported to {out_dir}"
            )
            return
        if not fake_quant_ran(pl_module):
            raise QATExportError(
                f"QATCallback: not exporting to {out_dir}: fake quantization never ran, the "
                f"fit stopped at epoch {trainer.current_epoch}, step {trainer.global_step}, "
                f"before quant_delay={self.quant_delay}; the model trained in float only. "
                "Lower quant_delay or train longer"
            )
        target = (
            pl_module if not self._export_target else pl_module.get_submodule(self._export_target)
        )
        self.export_paths = {}  # filled as each format is written, kept if a later one fails
        export_trained(
            target,
            self.example_input,
            out_dir,
            self.export_formats,
            self.config,
            metrics=validation_metrics(trainer) or None,
            written=self.export_paths,
            why_no_input=self._capture_refused,
        )
        rank_zero_info(summary(trainer, self.export_paths, self.integer_eval))

    # -- checkpointed progress -----------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # calibrated / bn_frozen / observers_frozen are the model's (its quantizer buffers);
        # they are still written so that older code reading this state finds them.
        # The example input as plain containers of CPU tensors; "example_input" keeps the
        # single-tensor form older code reads.
        model, example = self._model, self.example_input
        return {
            "calibrated": self.calibrated,
            "bn_frozen": bool(model is not None and bn_frozen(model)),
            "observers_frozen": bool(model is not None and not observers_running(model)),
            "export_target": self._export_target,
            "example_input": None if example is None else example.single_tensor(),
            "example_arguments": None if example is None else example.to_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Old and new states load alike; the progress flags in them are ignored (the
        # checkpoint's model state holds that progress).
        self._export_target = state_dict.get("export_target", self._export_target)
        if self.example_input is None:  # else the user's own
            saved = state_dict.get("example_arguments", state_dict.get("example_input"))
            self.example_input = ExampleInput.from_state(saved)
            self._captured_input = self.example_input is not None
