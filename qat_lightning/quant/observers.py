"""Observers: they watch tensors and say which range ``[min, max]`` to quantize.

Every statistic lives in a buffer, so a checkpoint taken mid-calibration resumes exactly.
Per-channel buffers are sized on the first observation (or on loading a state dict).
Non-finite values (NaN, +-Inf) are ignored; an observer that has seen nothing finite reports
``[0, 0]``, which the encoding turns into the smallest positive scale, never a NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.quant.functional import encodings_from_range, fake_quantize
from qat_lightning.quant.scheme import QuantScheme

# Tensors larger than this are strided down before sorting-based statistics.
_MAX_SAMPLES = 1 << 20


def _per_channel_rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as a (channels, elements) matrix."""
    return x.movedim(axis % x.dim(), 0).reshape(x.shape[axis % x.dim()], -1)


def _rows_aminmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row. On CPU ``aminmax(dim=1)`` is several times slower than
    ``amin`` plus ``amax`` (torch 2.x); on CUDA it is one fused pass."""
    if rows.is_cuda:
        return torch.aminmax(rows, dim=1)
    return rows.amin(dim=1), rows.amax(dim=1)


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class Observer(nn.Module):
    """Base class. Subclasses implement `_observe` and `calculate_range`."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme
        shape = (0,) if scheme.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    @property
    def has_data(self) -> bool:
        return bool(self.min_val.numel() > 0 and torch.isfinite(self.min_val).all())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._observe(x.detach().float())
        return x

    def _batch_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of one batch, per channel if the scheme says so, non-finite ignored."""
        # One finiteness check (one host sync) per batch: ``max - min`` is finite exactly when
        # both are (an overflowing difference only takes the slow path, with the same result).
        if self.scheme.per_channel:
            rows = _per_channel_rows(x, self.scheme.axis)
            mn, mx = _rows_aminmax(rows)
            if not torch.isfinite(mx - mn).all():
                mn, mx = _rows_aminmax(_zero_nonfinite(rows))
            return mn, mx
        if x.numel() == 0:
            return torch.zeros(()), torch.zeros(())
        mn, mx = torch.aminmax(x)
        if not torch.isfinite(mx - mn):
            finite = x[torch.isfinite(x)]
            if finite.numel() == 0:
                return torch.zeros((), device=x.device), torch.zeros((), device=x.device)
            mn, mx = torch.aminmax(finite)
        return mn, mx

    def _merge(self, name: str, new: torch.Tensor, reduce) -> None:
        old = getattr(self, name)
        if old.shape != new.shape:
            setattr(self, name, new.clone())
        else:
            old.copy_(torch.where(torch.isfinite(old), reduce(old, new), new))

    def _observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        self._merge("min_val", mn, torch.minimum)
        self._merge("max_val", mx, torch.maximum)

    def calculate_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize, ``[0, 0]`` where nothing finite was seen."""
        return self._finite_or_zero(self.min_val), self._finite_or_zero(self.max_val)

    @staticmethod
    def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
        return _zero_nonfinite(t)

    def reset(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Per-channel statistics are sized lazily: take the checkpoint's shape.
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty_like(incoming, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """The running min and max of everything seen."""


class MovingMinMaxObserver(Observer):
    """An exponential moving average of each batch's min and max (the first batch sets them)."""

    def _observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_minmax(x)
        c = self.scheme.averaging_constant

        def ema(old, new):
            return old + c * (new - old)

        self._merge("min_val", mn, ema)
        self._merge("max_val", mx, ema)


class _BatchStatisticObserver(Observer):
    """Computes a clipping range per batch and keeps the mean over batches."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Finite samples as (channels, n) rows; one row for per-tensor."""
        rows = (
            _per_channel_rows(x, self.scheme.axis) if self.scheme.per_channel else x.reshape(1, -1)
        )
        if rows.shape[1] > _MAX_SAMPLES:
            rows = rows[:, :: rows.shape[1] // _MAX_SAMPLES + 1]
        return rows

    def _observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        rows = self._rows(x)
        finite = torch.isfinite(rows)
        if not finite.all():
            # Replace non-finite samples by each row's median, which moves no percentile far.
            med = torch.nanmedian(torch.where(finite, rows, float("nan")), dim=1, keepdim=True)
            rows = torch.where(finite, rows, torch.nan_to_num(med.values, nan=0.0))
        mn, mx = self._batch_range(rows)
        if not self.scheme.per_channel:
            mn, mx = mn.reshape(()), mx.reshape(())
        n = self.batches.float()
        self._merge("min_val", mn, lambda old, new: (old * n + new) / (n + 1))
        self._merge("max_val", mx, lambda old, new: (old * n + new) / (n + 1))
        self.batches += 1

    def _batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # abstract: each subclass defines its statistic

    def reset(self) -> None:
        super().reset()
        self.batches.zero_()


class PercentileObserver(_BatchStatisticObserver):
    """Clip at a percentile: of ``|x|`` for symmetric schemes, of each tail for affine ones."""

    def _batch_range(self, rows):
        p = self.scheme.percentile / 100.0
        n = rows.shape[1]
        k_hi = max(1, min(n, round(p * n)))
        if self.scheme.symmetric:
            amax = rows.abs().kthvalue(k_hi, dim=1).values
            return -amax, amax
        k_lo = max(1, min(n, n + 1 - k_hi))
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


class MSEObserver(_BatchStatisticObserver):
    """Search shrunk ranges ``alpha * [min, max]`` for the one with least quantization MSE."""

    candidates = torch.linspace(0.2, 1.0, 41)

    def _batch_range(self, rows):
        mn, mx = _rows_aminmax(rows)
        if self.scheme.symmetric:
            amax = torch.maximum(-mn, mx)
            mn, mx = -amax, amax
        scheme = self.scheme.replace(
            granularity="per_channel", axis=0, learnable=False, observer="minmax"
        )
        best_err = torch.full_like(mn, float("inf"))
        best_mn, best_mx = mn.clone(), mx.clone()
        for alpha in self.candidates.tolist():
            scale, zp = encodings_from_range(mn * alpha, mx * alpha, scheme)
            err = (fake_quantize(rows, scale, zp, scheme) - rows).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mn = torch.where(better, mn * alpha, best_mn)
            best_mx = torch.where(better, mx * alpha, best_mx)
        return best_mn, best_mx


class EntropyObserver(Observer):
    """TensorRT-style calibration: the clip of ``|x|`` whose quantized histogram has least KL
    divergence from the observed one. The histogram grows with the range it has seen."""

    bins = 2048

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("histogram_max", torch.zeros((), dtype=torch.float64))

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)  # the running min/max keep the sign of the range
        values = x[torch.isfinite(x)].abs().flatten()
        if values.numel() == 0:
            return
        old_max = float(self.histogram_max)
        new_max = max(old_max, float(values.max()), 1e-12)
        if new_max > old_max and old_max > 0:
            self.histogram.copy_(_rebin(self.histogram, old_max, new_max))
        self.histogram_max.fill_(new_max)
        self.histogram += torch.histc(values, self.bins, 0.0, new_max).double()

    def calculate_range(self):
        mn, mx = super().calculate_range()
        if self.histogram.sum() == 0:
            return mn, mx
        levels = 2 ** (self.scheme.bits - 1) if self.scheme.signed else 2**self.scheme.bits
        levels = min(levels, self.bins)
        clip = _best_kl_clip(self.histogram, levels) * float(self.histogram_max) / self.bins
        return torch.clamp(mn, min=-clip), torch.clamp(mx, max=clip)

    def reset(self) -> None:
        super().reset()
        self.histogram.zero_()
        self.histogram_max.zero_()


def _rebin(hist: torch.Tensor, old_max: float, new_max: float) -> torch.Tensor:
    """Spread a histogram over [0, old_max] onto the same bin count over [0, new_max]."""
    bins = hist.numel()
    cdf = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    edges = torch.arange(bins + 1, dtype=torch.float64, device=hist.device) * (new_max / old_max)
    idx = edges.floor().clamp(max=bins - 1).long()
    frac = (edges - idx).clamp(max=1.0)
    at = cdf[idx] + frac * (cdf[idx + 1] - cdf[idx])
    at = torch.where(edges >= bins, cdf[-1], at)
    return at.diff()


def _best_kl_clip(hist: torch.Tensor, levels: int) -> float:
    """The bin index (as a float edge) that minimizes KL(reference || quantized)."""
    hist = hist.detach().cpu()
    bins = hist.numel()
    starts = range(levels, bins + 1, max(1, (bins - levels) // 128))
    best, best_i = float("inf"), bins
    for i in starts:
        ref = hist[:i].clone()
        ref[-1] += hist[i:].sum()
        chunk = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        nonzero = (hist[:i] > 0).double()
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[:i])
        counts = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nonzero)
        q = torch.where(nonzero > 0, sums[chunk] / counts[chunk].clamp(min=1), 0.0)
        p = ref / ref.sum()
        q = q / q.sum().clamp(min=1e-12)
        support = p > 0
        kl = float((p[support] * (p[support] / q[support].clamp(min=1e-12)).log()).sum())
        if kl < best:
            best, best_i = kl, i
    return float(best_i)


OBSERVER_TYPES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_minmax": MovingMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(scheme: QuantScheme) -> Observer:
    return OBSERVER_TYPES[scheme.observer](scheme)
