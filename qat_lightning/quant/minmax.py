"""The observer base and the min/max family: they watch tensors and say which range
``[min, max]`` to quantize.

Every statistic lives in a buffer, so a checkpoint taken mid-calibration resumes exactly.
Per-channel buffers are sized on the first observation (or on loading a state dict); a later
tensor with another channel count is an error, never a silent restart.
Non-finite values (NaN, +-Inf) are ignored, and a batch (or a channel) with nothing finite,
or an empty tensor, leaves the statistics as they were; an observer that has seen nothing
finite reports ``[0, 0]``, which the encoding turns into the smallest positive scale.

Per-group observers are per-channel observers over the tensor's rows of ``group_size``
elements of the last axis (`qat_lightning.quant.grouped`); their statistics have the shape
of the encoding, ``(*shape[:-1], shape[-1] // group_size)``. Dynamic schemes have no
observer (`NoObserver`): their range is each tensor's own.

The calibrators that clip the range (percentile, MSE, histogram, entropy) are in
`qat_lightning.quant.calibrators`; `qat_lightning.quant.observers` picks one by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat_lightning.quant.grouped import GroupSizeError, group_shape
from qat_lightning.quant.host_float32 import moving_average
from qat_lightning.quant.scheme import QuantScheme


class ChannelCountError(ValueError):
    """A per-channel observer saw a tensor with another channel count than before."""


def _scheme_rows(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``x`` as (encodings, elements) rows: channels along ``axis``, or groups."""
    if scheme.per_group:
        return x.reshape(-1, scheme.group_size)
    return _per_channel_rows(x, scheme.axis)


def _per_channel_rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as a (channels, elements) matrix."""
    return x.movedim(axis % x.dim(), 0).reshape(x.shape[axis % x.dim()], -1)


def _rows_aminmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row. On CPU ``aminmax(dim=1)`` is several times slower than
    ``amin`` plus ``amax`` (torch 2.x); on CUDA it is one fused pass."""
    if rows.is_cuda:
        return torch.aminmax(rows, dim=1)
    return rows.amin(dim=1), rows.amax(dim=1)


# Host merges and encodings run for values below this magnitude only: float32 sums and
# differences of them cannot overflow (float32's largest is 3.4e38).
_HOST_LIMIT = 1e38


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class Observer(nn.Module):
    """Base class: the running min and max. Subclasses change `_observe` and
    `calculate_range`."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme
        shape = (0,) if scheme.per_channel or scheme.per_group else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        # The last observed batch's finite (min, max) where the merge saw them finite: floats
        # per tensor, per-channel tensors per channel; None otherwise. Not state: it
        # describes one call.
        self.batch_range: tuple[float, float] | None = None
        # Per tensor, where that call merged the statistics on the host: the range
        # `calculate_range` now gives, as floats (so the encoding needs no device work).
        self.host_range: tuple[float, float] | None = None

    @property
    def has_data(self) -> bool:
        """Something finite was observed (in at least one channel)."""
        return bool(self.min_val.numel() > 0 and torch.isfinite(self.min_val).any())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return x

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> bool:
        """Update the statistics with ``x``; True when they are then known to be finite
        everywhere (so `has_data` holds without another host sync), False when unknown."""
        self._check_channels(x)
        self.batch_range = self.host_range = None
        if x.numel() == 0:
            return False
        return bool(self._observe(x.detach().float()))

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.scheme.per_group:
            try:
                shape = group_shape(x.shape, self.scheme.group_size, "a per_group observer")
            except GroupSizeError as error:
                raise ChannelCountError(str(error)) from error
            if self.min_val.numel() and tuple(self.min_val.shape) != shape:
                raise ChannelCountError(
                    f"a per_group observer (group_size={self.scheme.group_size}) saw groups "
                    f"of shape {tuple(self.min_val.shape)}, now a tensor of shape "
                    f"{tuple(x.shape)} with groups of shape {shape}: one quantizer must see "
                    "one shape"
                )
            return
        if not self.scheme.per_channel:
            return
        axis = self.scheme.axis
        if not -x.dim() <= axis < x.dim():
            raise ChannelCountError(
                f"a per_channel observer (axis={axis}) got a tensor of shape {tuple(x.shape)}, "
                f"which has no axis {axis}"
            )
        seen = self.min_val.numel()
        if seen and x.shape[axis] != seen:
            raise ChannelCountError(
                f"a per_channel observer (axis={axis}) saw {seen} channels (statistics of "
                f"shape {tuple(self.min_val.shape)}), now a tensor of shape {tuple(x.shape)} "
                f"with {x.shape[axis]}: one quantizer must see one channel count"
            )

    def _raw_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of one batch in the statistics' shape, non-finite values included."""
        if self.scheme.per_channel or self.scheme.per_group:
            mn, mx = _rows_aminmax(_scheme_rows(x, self.scheme))
            return self._shaped(mn, x), self._shaped(mx, x)
        return torch.aminmax(x)

    def _merge_if_finite(self, mn, mx, reduce_min, reduce_max) -> bool:
        """The common case in one host sync: if the batch's and the running statistics are all
        finite, set them to ``reduce(old, new)`` (what `_merge` computes there) and say True.

        ``(mx - mn) + (max_val - min_val)`` is finite exactly when all four are; an overflowing
        sum only sends a finite batch down the general path, which gives the same result.
        Per tensor the sync reads the four values instead, and keeps the batch's range in
        ``batch_range`` (fake quantization skips its clipping where nothing is outside); where
        the observer has a host form of its reduction (`_host_reduce`) and the statistics live
        on the CPU, the merge runs on those floats (the same float32 operations) and
        ``host_range`` holds the result.
        """
        old_mn, old_mx = self.min_val, self.max_val
        if old_mn.shape != mn.shape:
            return False
        if mn.dim() == 0:
            values = torch.stack((mn, mx, old_mn, old_mx)).tolist()
            if not all(map(math.isfinite, values)):
                return False
            self.batch_range = (values[0], values[1])
            if self._host_merge(values):
                return True
        elif not bool(torch.isfinite((mx - mn) + (old_mx - old_mn)).all()):
            return False
        elif self.scheme.per_channel:
            self.batch_range = (mn, mx)  # per channel: tensors (read where they are used)
        old_mn.copy_(reduce_min(old_mn, mn))
        old_mx.copy_(reduce_max(old_mx, mx))
        return True

    # ``reduce(old, new)`` of `_merge_if_finite` on float32 values held as Python floats, as
    # float32 arithmetic (bit for bit the tensor ops'), or None where an observer has none.
    _host_reduce = None

    def _host_merge(self, values: list[float]) -> bool:
        """Merge a per-tensor batch ``(min, max)`` into the running ``(min, max)`` (``values``,
        all finite) on the host, fill the two buffers and set ``host_range``; False where this
        observer has no host reduction, its statistics are not on the CPU or float32, or a
        value is so large that float32 arithmetic on it might overflow."""
        reduce = self._host_reduce
        if (
            reduce is None
            or self.min_val.device.type != "cpu"
            or self.min_val.dtype != torch.float32
            or max(map(abs, values)) >= _HOST_LIMIT
        ):
            return False
        mn, mx, old_mn, old_mx = values
        new_mn, new_mx = reduce(old_mn, mn, True), reduce(old_mx, mx, False)
        self.min_val.fill_(new_mn)
        self.max_val.fill_(new_mx)
        if type(self).calculate_range is Observer.calculate_range:
            self.host_range = (new_mn, new_mx)
        return True

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Min and max of one batch, per channel if the scheme says so, non-finite ignored
        (a channel with nothing finite gets ``[inf, -inf]``; None if nothing is finite)."""
        # One finiteness check (one host sync) per batch: ``max - min`` is finite exactly when
        # both are (an overflowing difference only takes the slow path, with the same result).
        if self.scheme.per_channel or self.scheme.per_group:
            rows = _scheme_rows(x, self.scheme)
            mn, mx = _rows_aminmax(rows)
            if not torch.isfinite(mx - mn).all():
                finite = torch.isfinite(rows)
                mn = torch.where(finite, rows, float("inf")).amin(dim=1)
                mx = torch.where(finite, rows, float("-inf")).amax(dim=1)
            return self._shaped(mn, x), self._shaped(mx, x)
        mn, mx = torch.aminmax(x)
        if not torch.isfinite(mx - mn):
            finite = x[torch.isfinite(x)]
            if finite.numel() == 0:
                return None
            mn, mx = torch.aminmax(finite)
        return mn, mx

    def _shaped(self, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-row statistic in the encoding's shape (per group: the group shape)."""
        if self.scheme.per_group:
            return stat.reshape(group_shape(x.shape, self.scheme.group_size))
        return stat

    def _merge(self, name: str, new: torch.Tensor, reduce) -> None:
        """``reduce(old, new)`` where both are finite, ``new`` where only it is, else ``old``."""
        old = getattr(self, name)
        if old.shape != new.shape:  # the first observation sizes per-channel statistics
            setattr(self, name, new.clone())
            return
        merged = torch.where(torch.isfinite(old), reduce(old, new), new)
        old.copy_(torch.where(torch.isfinite(new), merged, old))

    def _observe(self, x: torch.Tensor) -> bool:
        """Update the statistics; True when they are known to be finite afterwards."""
        return self._observe_range(x, torch.minimum, torch.maximum)

    def _observe_range(self, x: torch.Tensor, reduce_min, reduce_max) -> bool:
        """Merge the batch's min and max into the running ones with ``reduce_*(old, new)``
        (`_merge`'s rules for non-finite values); True when all is known to be finite."""
        mn, mx = self._raw_minmax(x)
        if self._merge_if_finite(mn, mx, reduce_min, reduce_max):
            return True
        batch = self._batch_minmax(x)
        if batch is not None:
            self._merge("min_val", batch[0], reduce_min)
            self._merge("max_val", batch[1], reduce_max)
        return False

    def calculate_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize, ``[0, 0]`` where nothing finite was seen."""
        return self._finite_or_zero(self.min_val), self._finite_or_zero(self.max_val)

    @staticmethod
    def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
        return _zero_nonfinite(t)

    def reset(self) -> None:
        self.host_range = None
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.host_range = None  # it described the statistics before these
        # Per-channel statistics are sized lazily: take the checkpoint's shape.
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """The running min and max of everything seen."""

    def _host_reduce(self, old: float, new: float, is_min: bool) -> float:
        return min(old, new) if is_min else max(old, new)


class MovingMinMaxObserver(Observer):
    """An exponential moving average of each batch's min and max (the first batch sets them)."""

    def _observe(self, x: torch.Tensor) -> bool:
        c = self.scheme.averaging_constant

        def ema(old, new):
            return old + c * (new - old)

        return self._observe_range(x, ema, ema)

    def _host_reduce(self, old: float, new: float, is_min: bool) -> float:
        return moving_average(old, new, self.scheme.averaging_constant)


class NoObserver(Observer):
    """The observer of a dynamic scheme: it keeps nothing (each tensor's own range is its
    encoding, computed at run time) and never has data."""

    def _check_channels(self, x: torch.Tensor) -> None:
        pass

    def _observe(self, x: torch.Tensor) -> None:
        pass
