"""Calibrators: observers that clip the range to what quantizes best, not to min and max.

Per-tensor ``percentile``, ``mse``, ``histogram`` and ``entropy`` pool every calibration batch
into one histogram and compute their range from it. Per-channel ``percentile`` and ``mse``
(weights: the same tensor in every batch) compute each batch's range exactly and keep the
mean over batches; ``batch_percentile`` asks for that per-batch mean explicitly.
"""

from __future__ import annotations

import torch

from qat_lightning.quant.functional import encodings_from_range, fake_quantize
from qat_lightning.quant.histogram import (
    add_to_histogram,
    best_kl_bins,
    bin_means,
    magnitude_view,
    quantile,
    range_errors,
    search_ratio,
    search_ratio_pair,
    signed_view,
)
from qat_lightning.quant.minmax import Observer, _rows_aminmax, _scheme_rows
from qat_lightning.quant.scheme import QuantScheme

# Tensors larger than this are strided down before sorting-based statistics.
_MAX_SAMPLES = 1 << 20


# -- per-batch statistics (per-channel percentile and mse; batch_percentile) ---------------------
class _BatchStatisticObserver(Observer):
    """Computes a clipping range per batch and keeps the mean over batches."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Finite samples as (channels, n) rows; one row for per-tensor."""
        multi = self.scheme.per_channel or self.scheme.per_group
        rows = _scheme_rows(x, self.scheme) if multi else x.reshape(1, -1)
        if rows.shape[1] > _MAX_SAMPLES:
            rows = rows[:, :: rows.shape[1] // _MAX_SAMPLES + 1]
        return rows

    def _observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        finite = torch.isfinite(rows)
        seen = finite.any(dim=1)
        if not seen.any():
            return  # nothing finite: this batch says nothing about the range
        if not finite.all():
            # Replace non-finite samples by each row's median, which moves no percentile far;
            # a row with nothing finite keeps its previous statistics (masked below).
            med = torch.nanmedian(torch.where(finite, rows, float("nan")), dim=1, keepdim=True)
            rows = torch.where(finite, rows, torch.nan_to_num(med.values, nan=0.0))
        mn, mx = self._batch_range(rows)
        mn = torch.where(seen, mn, float("nan"))
        mx = torch.where(seen, mx, float("nan"))
        if self.scheme.per_channel or self.scheme.per_group:
            mn, mx = self._shaped(mn, x), self._shaped(mx, x)
        else:
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


class BatchPercentileObserver(_BatchStatisticObserver):
    """Clip each batch at a percentile (of ``|x|`` for symmetric schemes, of each tail for
    affine ones) and keep the mean over batches."""

    def _batch_range(self, rows):
        p = self.scheme.percentile / 100.0
        n = rows.shape[1]
        k_hi = max(1, min(n, round(p * n)))
        if self.scheme.symmetric:
            amax = rows.abs().kthvalue(k_hi, dim=1).values
            return -amax, amax
        k_lo = max(1, min(n, n + 1 - k_hi))
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


class BatchMSEObserver(_BatchStatisticObserver):
    """Per batch, the shrunk range ``ratio * [min, max]`` with least quantization MSE on the
    batch itself (a coarse grid over (0, 1], then finer grids around the best ratio)."""

    def _batch_range(self, rows):
        mn, mx = _rows_aminmax(rows)
        if self.scheme.symmetric:
            amax = torch.maximum(-mn, mx)
            mn, mx = -amax, amax
        scheme = self.scheme.replace(
            granularity="per_channel", axis=0, learnable=False, observer="minmax", group_size=None
        )
        lo, hi = torch.zeros_like(mn), torch.ones_like(mn)
        best = torch.ones_like(mn)
        best_err = torch.full_like(mn, float("inf"))
        points = 17
        for _ in range(3):  # each round 8x finer, around each channel's best ratio
            for k in range(points):
                ratio = (lo + (hi - lo) * k / (points - 1)).clamp(min=1e-4)
                scale, zp = encodings_from_range(mn * ratio, mx * ratio, scheme)
                err = (fake_quantize(rows, scale, zp, scheme) - rows).pow(2).mean(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, ratio, best)
            step = (hi - lo) / (points - 1)
            lo, hi = (best - step).clamp(min=0.0), (best + step).clamp(max=1.0)
        return mn * best, mx * best


# -- pooled histogram (per-tensor percentile, mse, histogram, entropy) ----------------------------
class HistogramObserver(Observer):
    """The running min/max plus one histogram of every calibration value (see
    `qat_lightning.quant.histogram`); subclasses choose the range from the histogram."""

    bins = 2048

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.register_buffer("histogram", torch.zeros(2, self.bins, dtype=torch.float64))
        self.register_buffer("histogram_sum", torch.zeros(2, self.bins, dtype=torch.float64))
        self.register_buffer("histogram_max", torch.zeros((), dtype=torch.float64))

    def _observe(self, x: torch.Tensor) -> bool:
        finite = super()._observe(x)  # the running min/max: the range never goes beyond them
        add_to_histogram(self.histogram, self.histogram_sum, self.histogram_max, x)
        return finite

    def calculate_range(self):
        mn, mx = super().calculate_range()
        if self.histogram.sum() == 0:
            return mn, mx
        lo, hi = self._histogram_range(float(self.histogram_max))
        lo_t, hi_t = torch.tensor(lo, dtype=mn.dtype), torch.tensor(hi, dtype=mx.dtype)
        # Inside the observed range, also where the histogram's bins are wider than it (a
        # range of denormals): [lo, hi] never reaches beyond [min, max].
        lo_t = torch.clamp(lo_t, min=mn, max=mx)
        hi_t = torch.clamp(hi_t, min=lo_t, max=mx)
        return lo_t.to(mn.device), hi_t.to(mx.device)

    def _histogram_range(self, hist_max: float) -> tuple[float, float]:
        raise NotImplementedError  # abstract: each subclass defines its statistic

    def _errors_of(self):
        """``(values, counts)`` of the non-empty bins (each bin's mean value), ascending."""
        return bin_means(self.histogram, self.histogram_sum)

    def reset(self) -> None:
        super().reset()
        self.histogram.zero_()
        self.histogram_sum.zero_()
        self.histogram_max.zero_()


class PercentileObserver(HistogramObserver):
    """Clip at a percentile of all calibration data: of ``|x|`` for symmetric schemes, of
    each tail for affine ones."""

    def _histogram_range(self, hist_max):
        p = self.scheme.percentile / 100.0
        if self.scheme.symmetric:
            amax = quantile(*magnitude_view(self.histogram, hist_max, self.scheme.signed), p)
            return -amax, amax
        counts, edges = signed_view(self.histogram, hist_max)
        return quantile(counts, edges, 1.0 - p), quantile(counts, edges, p)


class MSEObserver(HistogramObserver):
    """The shrunk range ``ratio * [min, max]`` with least quantization MSE over all
    calibration data, found by a coarse-to-fine search of the ratio."""

    def _histogram_range(self, hist_max):
        mn, mx = (float(t) for t in Observer.calculate_range(self))
        if self.scheme.symmetric:
            mx = max(-mn, mx) if self.scheme.signed else mx
            mn = -mx
        centers, counts = self._errors_of()

        def errors(ratios):
            return range_errors(centers, counts, mn * ratios, mx * ratios, self.scheme)

        ratio = search_ratio(errors)
        return mn * ratio, mx * ratio


class L2HistogramObserver(MSEObserver):
    """Least quantization MSE over all calibration data, as torch.ao's HistogramObserver:
    for affine schemes the low and the high end shrink independently; for symmetric ones it
    is `MSEObserver`."""

    def _histogram_range(self, hist_max):
        if self.scheme.symmetric:
            return super()._histogram_range(hist_max)
        mn, mx = (float(t) for t in Observer.calculate_range(self))
        centers, counts = self._errors_of()

        def errors(lo, hi):
            return range_errors(centers, counts, mn * lo, mx * hi, self.scheme)

        lo, hi = search_ratio_pair(errors)
        return mn * lo, mx * hi


class EntropyObserver(HistogramObserver):
    """TensorRT-style calibration: the clip of ``|x|`` whose quantized histogram has least KL
    divergence from the observed one."""

    def _histogram_range(self, hist_max):
        levels = 2 ** (self.scheme.bits - 1) if self.scheme.signed else 2**self.scheme.bits
        counts, _ = magnitude_view(self.histogram, hist_max, True)
        clip = best_kl_bins(counts, min(levels, self.bins)) * hist_max / self.bins
        return -clip, clip
