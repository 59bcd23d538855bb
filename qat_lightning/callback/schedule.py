"""Points in training, given as ``{"epoch": 3}`` or ``{"step": 500}`` (or a bare int: an epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
