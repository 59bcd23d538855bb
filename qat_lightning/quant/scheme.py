"""`QuantScheme`: what a quantizer does, as one frozen, validated value.

A scheme says *what* (bits, symmetric or affine, granularity, how ranges are observed); a
`Quantizer` holds the *state* (scale, zero point, observer statistics) that a scheme implies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
OBSERVERS = (
    "minmax",
    "moving_minmax",
    "percentile",
    "batch_percentile",
    "mse",
    "histogram",
    "entropy",
)
REPRESENTATIONS = ("int", "fixed_point")
# Observers that build a histogram of the whole tensor; they have no per-channel form.
HISTOGRAM_OBSERVERS = ("histogram", "entropy")
# Granularities whose encoding is a tensor of scales rather than one scale.
MULTI_SCALE = ("per_channel", "per_group", "per_token")
# What a dynamic scheme may be: its range is each tensor's own min/max, computed at run time.
DYNAMIC_GRANULARITIES = ("per_tensor", "per_token")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"QuantScheme.{field}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor is quantized.

    Args:
        bits: code width, 2..16.
        symmetric: scale-only form of NVIDIA pytorch-quantization,
            ``q = round(clip(x, -a, a) * qmax / a)`` with zero point 0; otherwise affine
            (scale and zero point, the range always includes 0), as in torch.ao.
        signed: signed codes (``int8``) or unsigned (``uint8``).
        narrow_range: drop the most negative code, so a signed range is symmetric
            (``[-127, 127]`` at 8 bits). Signed schemes only.
        granularity: ``"per_tensor"``; ``"per_channel"`` (one encoding per slice along
            ``axis``); ``"per_group"`` (one encoding per ``group_size`` consecutive elements
            of the *last* axis: the input dimension of a Linear weight ``(out, in)``, the
            embedding dimension of an Embedding table; the scale has shape
            ``(*shape[:-1], shape[-1] // group_size)``); or ``"per_token"`` (one encoding per
            row over the last axis, dynamic activation schemes only).
        axis: the channel axis for ``per_channel`` (unused by the other granularities).
        group_size: elements per group of ``per_group`` (any integer >= 1; it must divide
            the last dimension of the tensor, checked when a quantizer meets it); None for
            every other granularity.
        observer: how calibration sets the range: ``minmax``, ``moving_minmax`` (EMA),
            ``percentile`` (of all calibration data), ``batch_percentile`` (the mean of each
            batch's percentile), ``mse`` (the clip ratio with least quantization MSE),
            ``histogram`` (least MSE, both ends clipped independently, as torch.ao's
            HistogramObserver; per-tensor only) or ``entropy`` (KL divergence, as TensorRT;
            per-tensor only). Per-channel ``percentile`` and ``mse`` use each batch's exact
            statistic, averaged over batches.
        averaging_constant: EMA factor of ``moving_minmax``, in (0, 1].
        percentile: the percentile of ``percentile``, in (50, 100].
        learnable: the scale is a parameter trained with LSQ (Esser et al. 2020).
        representation: ``"int"``, or ``"fixed_point"``: Qm.n codes with a power-of-two scale
            ``2**-frac_bits`` that no observer changes.
        frac_bits: fractional bits of ``fixed_point``, 0..bits.
        dynamic: the range is the min/max of each tensor itself, computed at run time (per
            tensor or per token): no observer, nothing to calibrate (torchao's dynamic
            activations, e.g. "8da4w"). Activations only: a weight scheme refuses it (a
            weight's range is known before it is used; use a static scheme for weights).

    Example:
        >>> QuantScheme(bits=4, granularity="per_channel", axis=0).qmax
        7
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"
    axis: int = 0
    observer: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    learnable: bool = False
    representation: str = "int"
    frac_bits: int | None = None
    group_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        for name in ("symmetric", "signed", "narrow_range", "learnable", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, int)
            or not 2 <= self.bits <= 16
        ):
            _fail("bits", self.bits, "an integer in 2..16")
        if self.granularity not in GRANULARITIES:
            _fail("granularity", self.granularity, f"one of {GRANULARITIES}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            _fail("axis", self.axis, "an integer channel axis")
        if self.observer not in OBSERVERS:
            _fail("observer", self.observer, f"one of {OBSERVERS}")
        grouped = self.granularity in ("per_channel", "per_group")
        if grouped and self.observer in HISTOGRAM_OBSERVERS:
            _fail(
                "observer",
                self.observer,
                f"a {self.granularity} scheme uses minmax, moving_minmax, percentile, "
                "batch_percentile or mse",
            )
        self._check_group_size()
        self._check_dynamic()
        if not isinstance(self.averaging_constant, (int, float)) or not (
            0.0 < self.averaging_constant <= 1.0
        ):
            _fail("averaging_constant", self.averaging_constant, "a number in (0, 1]")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            _fail("percentile", self.percentile, "a number in (50, 100]")
        if self.narrow_range and not self.signed:
            _fail("narrow_range", self.narrow_range, "False for an unsigned scheme")
        if self.representation not in REPRESENTATIONS:
            _fail("representation", self.representation, f"one of {REPRESENTATIONS}")
        if self.representation == "fixed_point":
            if (
                isinstance(self.frac_bits, bool)
                or not isinstance(self.frac_bits, int)
                or not (0 <= self.frac_bits <= self.bits)
            ):
                _fail(
                    "frac_bits",
                    self.frac_bits,
                    f"an integer in 0..bits ({self.bits}) for fixed_point",
                )
            if not self.symmetric:
                _fail("symmetric", self.symmetric, "True for fixed_point (zero point is 0)")
            if self.learnable:
                _fail("learnable", self.learnable, "False for fixed_point (the scale is fixed)")
        elif self.frac_bits is not None:
            _fail("frac_bits", self.frac_bits, "None unless representation='fixed_point'")

    def _check_group_size(self) -> None:
        if self.granularity != "per_group":
            if self.group_size is not None:
                _fail("group_size", self.group_size, "None unless granularity='per_group'")
            return
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            _fail("group_size", size, "an integer >= 1 for granularity='per_group'")

    def _check_dynamic(self) -> None:
        if not self.dynamic:
            if self.granularity == "per_token":
                _fail(
                    "granularity",
                    self.granularity,
                    "'per_token' only with dynamic=True (each batch has other tokens; a "
                    "calibrated per-token scale means nothing)",
                )
            return
        if self.granularity not in DYNAMIC_GRANULARITIES:
            _fail("granularity", self.granularity, f"one of {DYNAMIC_GRANULARITIES} when dynamic")
        if self.learnable:
            _fail("learnable", self.learnable, "False when dynamic (the scale is computed)")
        if self.representation != "int":
            _fail("representation", self.representation, "'int' when dynamic")
        if self.observer != "minmax":
            _fail(
                "observer",
                self.observer,
                "'minmax' when dynamic (the range is each tensor's own min and max)",
            )

    @property
    def qmin(self) -> int:
        """The smallest code."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        """The largest code."""
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    @property
    def per_group(self) -> bool:
        return self.granularity == "per_group"

    @property
    def multi_scale(self) -> bool:
        """The encoding is a tensor of scales (per channel, group or token), not one."""
        return self.granularity in MULTI_SCALE

    def replace(self, **changes: Any) -> QuantScheme:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, value: QuantScheme | dict[str, Any] | None) -> QuantScheme | None:
        """Accept a scheme, a plain dict of its fields (e.g. from Hydra) or None."""
        if value is None or isinstance(value, QuantScheme):
            return value
        if isinstance(value, dict) or hasattr(value, "items"):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise ValueError(
                    f"QuantScheme has no field {unknown[0]!r}: allowed {sorted(fields)}"
                )
            return cls(**dict(value))
        raise TypeError(f"expected a QuantScheme or a dict, got {type(value).__name__}")
