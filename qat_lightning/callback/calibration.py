"""Calibration: run training batches through the model without changing it, then start QAT.

`observe_batches` runs the first training batches with observers on and fake quant off (no
gradient, BN buffers restored after each batch); `start_fake_quant` fixes the encodings and
turns fake quantization on.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from qat_lightning.callback.distributed import sync_observers
from qat_lightning.callback.health import named_quantizers
from qat_lightning.export.example_input import ExampleInput
from qat_lightning.nn import QuantModule
from qat_lightning.quant.quantizer import warn_only_zeros
from qat_lightning.surgery import QuantizationReport
from qat_lightning.surgery.outside_reads import revert_unobserved

# Observers cheap enough to keep running on every QAT step; the others freeze after calibration.
_TRACKING_OBSERVERS = ("minmax", "moving_minmax")


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantModule) for m in module.modules())


def non_quantizer_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer that is not quantizer state (BN statistics and the like)."""
    return {
        name: buf.clone() for name, buf in module.named_buffers() if not _is_quantizer_buffer(name)
    }


def _is_quantizer_buffer(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("input_quantizers", "output_quantizers", "param_quantizers") for p in parts)


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, buf in module.named_buffers():
        if name in saved:
            buf.copy_(saved[name])


@contextlib.contextmanager
def silenced_logging(pl_module: pl.LightningModule):
    """training_step may call self.log; during calibration those values are not training."""
    pl_module.log = lambda *args, **kwargs: None
    pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)


class InputCapture:
    """Remembers the arguments, positional and keyword, of the first call of the
    LightningModule's forward (or, if training_step calls a child directly, of the outermost
    child holding quantized layers): tensors detached, on CPU, cut to their first 2 rows
    along the batch. A call whose arguments an export cannot take (a string, a nested list)
    is not captured (nor, then, a child's call instead); `finish` says why."""

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.seen: dict[str, ExampleInput] = {}
        self.refused: dict[str, str] = {}
        self.order: list[str] = []
        self.handles = []
        candidates = [("", pl_module)] + [
            (name, child) for name, child in pl_module.named_children() if is_quantized(child)
        ]
        for name, module in candidates:
            self.handles.append(
                module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            )

    def _hook(self, name: str):
        # Eager also in a compiled training_step: it only keeps tensors, and traced, its
        # checks of ``name`` and ``seen`` would recompile it for every module and batch.
        @torch.compiler.disable
        def hook(module, args, kwargs):
            if name in self.seen or name in self.refused:
                return
            example = ExampleInput(tuple(args), dict(kwargs))
            try:
                example.check(
                    f"{type(module).__name__}.forward was called with arguments "
                    "an export cannot take"
                )
            except ValueError as error:
                self.refused[name] = str(error)
                return
            self.seen[name] = example.snapshot()
            self.order.append(name)

        return hook

    def finish(self) -> tuple[ExampleInput | None, str | None, str | None]:
        """``(example, export target name, why nothing was captured)``."""
        for handle in self.handles:
            handle.remove()
        if "" in self.seen:
            return self.seen[""], "", None
        if "" in self.refused:  # its forward ran: a child's arguments are not the model's
            return None, None, self.refused[""]
        if self.order:
            return self.seen[self.order[0]], self.order[0], None
        return None, None, self.refused.get("") or next(iter(self.refused.values()), None)


@dataclass
class CalibrationPass:
    """What `observe_batches` saw."""

    seen: int  # batches observed
    quantizers: int  # quantizers observing them
    started: float  # time.perf_counter() when they started
    captured: tuple[ExampleInput | None, str | None, str | None] | None  # InputCapture.finish()


@torch.no_grad()
def observe_batches(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: int, capture: bool
) -> CalibrationPass:
    """Run the first ``batches`` training batches with observers on and fake quant off.

    Args:
        trainer: the fitting Trainer (its train loader, strategy and precision plugin).
        pl_module: the quantized LightningModule; only its observers change.
        batches: how many batches to observe at most.
        capture: keep the first forward call's arguments as the export's example input.

    Returns:
        the batches seen, the quantizer count, the start time and the captured input.
    """
    if not pl_module.automatic_optimization:
        raise ValueError(
            "QATCallback calibrates by running training_step without gradients, which a "
            "LightningModule with manual optimization (automatic_optimization=False) would "
            "step; calibrate the model yourself (Quantizer.compute_encodings) before fit"
        )
    quantizers = [q for _, q in named_quantizers(pl_module)]
    for quantizer in quantizers:
        quantizer.observer.reset()
        quantizer.enable_observer(True).enable_fake_quant(False)
    loader = trainer.train_dataloader
    if isinstance(loader, (dict, list, tuple)):
        loader = CombinedLoader(loader, mode="max_size_cycle")
    frozen_buffers = non_quantizer_buffers(pl_module)
    capturing = InputCapture(pl_module) if capture else None
    start, seen = time.perf_counter(), 0
    rank_zero_info(f"QATCallback: calibrating on {batches} batches")
    with contextlib.ExitStack() as observing:
        for quantizer in quantizers:  # submodules in eval mode observe too
            observing.enter_context(quantizer.observing())
        observing.enter_context(silenced_logging(pl_module))
        observing.enter_context(trainer.precision_plugin.train_step_context())
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= batches:
                break
            batch = trainer.strategy.batch_to_device(batch)
            pl_module.training_step(batch, batch_idx)
            seen += 1
            restore_buffers(pl_module, frozen_buffers)
    captured = capturing.finish() if capturing is not None else None
    return CalibrationPass(seen, len(quantizers), start, captured)


@torch.no_grad()
def start_fake_quant(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    run: CalibrationPass,
    batches: int,
    report: QuantizationReport | None,
) -> None:
    """After `observe_batches`: sync the observed ranges across ranks, fix the encodings and
    turn fake quant on; observers keep tracking where cheap (min/max, not learnable, weights
    only under DDP). Nothing happens, but a warning, when no batch was seen.
    """
    if run.seen == 0:
        rank_zero_warn(
            "QATCallback: the train loader gave no batches, so nothing was calibrated: "
            "the model trains in float and is not exported"
        )
        return
    if run.seen < batches:
        rank_zero_warn(
            f"QATCallback(calibration_batches={batches}) is more than the "
            f"train loader has; calibrated on the {run.seen} batches there are"
        )
    sync_observers(pl_module)
    revert_unobserved(pl_module, report)  # weights read outside forward: float
    # Under DDP each rank sees other data: activation observers stop here (their synced
    # ranges stay identical on all ranks); weight observers may go on, since DDP keeps
    # the weights identical.
    distributed = trainer.world_size > 1
    for name, quantizer in named_quantizers(pl_module):
        quantizer.update_encodings()
        quantizer.enable_fake_quant(True)
        tracking = quantizer.scheme.observer in _TRACKING_OBSERVERS
        if distributed and "param_quantizers" not in name:
            tracking = False
        quantizer.enable_observer(tracking and not quantizer.scheme.learnable)
    if trainer.is_global_zero:
        warn_only_zeros(named_quantizers(pl_module))
    rank_zero_info(
        f"QATCallback: calibrated {run.quantizers} quantizers on {run.seen} batches in "
        f"{time.perf_counter() - run.started:.1f} s; QAT starts"
    )
