"""What the callback knows about a model and a run, read from the model and the Trainer.

Progress (calibrated, BN frozen, observers running) lives in the model's quantizer buffers, so
it travels with the model and its checkpoints: one callback on a second model calibrates that
model; a resumed checkpoint is not calibrated again. Nothing here is kept on the callback.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch import nn

from qat_lightning.callback.health import named_quantizers
from qat_lightning.callback.schedule import Milestone
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import QuantConfig
from qat_lightning.surgery.report import describe_scheme
from qat_lightning.surgery.report import scheme_text as describe


def is_calibrated(model: nn.Module) -> bool:
    """Whether any data-driven quantizer of ``model`` has an encoding set from data (its
    ``initialized`` buffer). Fixed-point and dynamic quantizers are initialized from the start
    (nothing to calibrate) and don't count."""
    return any(
        bool(q.initialized)
        for _, q in named_quantizers(model)
        if q.scheme.representation != "fixed_point" and not q.scheme.dynamic
    )


def fake_quant_ran(model: nn.Module) -> bool:
    """Whether fake quantization is on for some quantizer (off until ``quant_delay``)."""
    return any(bool(q.fake_quant_enabled) for _, q in named_quantizers(model))


def bn_frozen(model: nn.Module) -> bool | None:
    """Whether every fused BatchNorm's statistics are frozen; None: no fused BatchNorm."""
    flags = [bool(m.bn_frozen) for m in model.modules() if hasattr(m, "bn_frozen")]
    return all(flags) if flags else None


def observers_running(model: nn.Module) -> bool:
    return any(bool(q.observer_enabled) for _, q in named_quantizers(model))


def steps_per_epoch(trainer: pl.Trainer) -> float:
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return math.inf
    return math.ceil(batches / max(trainer.accumulate_grad_batches, 1))


def check_milestone_in_run(name: str, milestone: Milestone, trainer: pl.Trainer) -> None:
    """Raise if ``milestone`` lies at or after the end of the run (it would never happen).

    Raises:
        ValueError: naming the argument, its value and the run's length.
    """
    max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
    per_epoch = steps_per_epoch(trainer)
    length = []
    if max_epochs is not None:
        length.append(f"max_epochs={max_epochs} ({per_epoch} optimizer steps per epoch)")
    if max_steps is not None:
        length.append(f"max_steps={max_steps}")
    if milestone.unit == "epoch":
        limits = [max_epochs] if max_epochs is not None else []
        if max_steps is not None and per_epoch > 0:
            limits.append(math.ceil(max_steps / per_epoch))
    else:
        limits = [max_steps] if max_steps is not None else []
        if max_epochs is not None and math.isfinite(per_epoch):
            limits.append(max_epochs * per_epoch)
    if limits and milestone.value >= min(limits):
        end = int(min(limits))
        raise ValueError(
            f"QATCallback({name}={milestone}) is past the end of the run: the Trainer's "
            f"{' and '.join(length)} end at {milestone.unit} {end}; allowed "
            f"{milestone.unit} < {end}, None, or a longer run"
        )


def _label(scheme) -> str:
    return describe_scheme(scheme) + (f" {scheme.observer}" if scheme is not None else "")


def config_mismatches(model: nn.Module, config: QuantConfig) -> list[str]:
    """How the quantizers already in ``model`` differ from what ``config`` asks for (empty:
    the model is quantized exactly as ``config`` would quantize it)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        if config.skip_pattern(name) is not None:
            found.append(f"{name!r} is quantized, the new config skips it")
            continue
        inputs, params = config.schemes_for(name)
        have = [*module.input_quantizers, *module.output_quantizers]
        for quantizer in have:
            if quantizer is not None and quantizer.scheme != inputs:
                found.append(
                    f"{name!r} activations: {_label(quantizer.scheme)} vs {_label(inputs)}"
                )
                break
        for param, quantizer in module.param_quantizers.items():
            if quantizer is None and param != "weight":
                continue
            want = params
            got = None if quantizer is None else quantizer.scheme
            if got is not None and want is not None and want.per_channel:
                want = want.replace(axis=got.axis)
            if got != want:
                found.append(f"{name!r} {param}: {_label(got)} vs {_label(want)}")
    return found


def refuse_multiprocessing(trainer: pl.Trainer) -> None:
    """Spawned / forked DDP trains copies of the model in child processes: refuse it."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher).__name__ == "_MultiProcessingLauncher":
        method = getattr(launcher, "_start_method", "?")
        raise ValueError(
            f"QATCallback does not support Trainer(strategy={type(trainer.strategy).__name__}"
            f"(start_method={method!r})), i.e. ddp_spawn / ddp_fork / ddp_notebook: the "
            'caller\'s model would stay float; allowed strategy="ddp" (one process per '
            "device, each quantizing its model)"
        )


def check_same_config(model: nn.Module, config: QuantConfig) -> None:
    """An already quantized model is accepted only if ``config`` would quantize it the same.

    Raises:
        ValueError: naming both configurations and the first differences.
    """
    mismatches = config_mismatches(model, config)
    if mismatches:
        raise ValueError(
            "QATCallback: the model is already quantized with another configuration than "
            f"this callback's (inputs: {describe(config.inputs)}; params: "
            f"{describe(config.params)}): "
            + "; ".join(mismatches[:3])
            + (f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else "")
            + ". Quantizing twice is not supported: pass the float model, or a QATCallback "
            "with the configuration the model has"
        )
