"""Points in training, given as ``{"epoch": 3}`` or ``{"step": 500}`` (or a bare int: an epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from qat_lightning.callback.health import named_quantizers
from qat_lightning.nn import QuantModule


@dataclass(frozen=True)
class Milestone:
    """A point in training: ``unit`` is ``"epoch"`` or ``"step"`` (optimizer steps)."""

    unit: str
    value: int

    @classmethod
    def parse(cls, name: str, value: Any) -> Milestone | None:
        """Validate a schedule argument; ``None`` means never.

        Raises:
            ValueError: naming the argument, the value and the accepted forms.
        """
        if value is None:
            return None
        allowed = "None, an epoch number, {'epoch': N} or {'step': N} with N >= 0"
        if isinstance(value, bool):
            raise ValueError(f"QATCallback({name}={value!r}) is invalid: allowed {allowed}")
        if isinstance(value, int):
            value = {"epoch": value}
        if not hasattr(value, "items") or len(value) != 1:
            raise ValueError(f"QATCallback({name}={value!r}) is invalid: allowed {allowed}")
        ((unit, n),) = value.items()
        if unit not in ("epoch", "step") or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"QATCallback({name}={dict(value)!r}) is invalid: allowed {allowed}")
        return cls(unit, n)

    def reached(self, epoch: int, step: int) -> bool:
        """Whether training at (``epoch``, optimizer ``step``) is at or past this point."""
        return (epoch if self.unit == "epoch" else step) >= self.value

    def __str__(self) -> str:
        return f"{{'{self.unit}': {self.value}}}"


def apply_schedule(
    model: nn.Module,
    epoch: int,
    step: int,
    milestones: tuple[Milestone | None, Milestone | None, Milestone | None],
    applied: set[str],
) -> None:
    """Put ``model`` in the state the schedule asks for at (``epoch``, ``step``).

    ``milestones`` are (freeze_bn_at, freeze_observers_at, quant_delay). Freezing is done once
    per fit (``applied`` records it, ``"bn"`` / ``"observers"``); what it changes lives in the
    model's buffers, so a resumed checkpoint carries it.
    """
    freeze_bn_at, freeze_observers_at, quant_delay = milestones
    freeze_bn = freeze_bn_at is not None and freeze_bn_at.reached(epoch, step)
    if freeze_bn and "bn" not in applied:
        for module in model.modules():
            if hasattr(module, "freeze_bn_stats"):
                module.freeze_bn_stats()
        applied.add("bn")
        rank_zero_info(f"QATCallback: BatchNorm statistics frozen at epoch {epoch}, step {step}")
    if freeze_bn:  # standalone BNs: Lightning puts the model back in train mode
        modules = list(model.modules())
        fused = {id(getattr(m, "bn", None)) for m in modules if isinstance(m, QuantModule)}
        for module in modules:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in fused:
                module.eval()
    freeze_observers = freeze_observers_at is not None and freeze_observers_at.reached(epoch, step)
    if freeze_observers and "observers" not in applied:
        for _, quantizer in named_quantizers(model):
            quantizer.enable_observer(False)
        applied.add("observers")
        rank_zero_info(f"QATCallback: observers frozen at epoch {epoch}, step {step}")
    quant_on = quant_delay is None or quant_delay.reached(epoch, step)
    for _, quantizer in named_quantizers(model):
        quantizer.enable_fake_quant(quant_on)
