"""Histogram statistics behind the calibration observers: growing a histogram, percentiles,
and the three range searches (quantization MSE, L2 over an asymmetric clip, KL divergence).

A histogram here is two rows of ``bins`` counts over ``[0, max]``: row 0 counts ``-x`` for
negative ``x``, row 1 counts ``x >= 0``. Growing the range re-bins both rows, so every count is
kept; all calibration batches pool into one histogram (as NVIDIA's HistogramCalibrator and
torch.ao's HistogramObserver do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qat_lightning.quant.functional import encodings_from_range, fake_quantize
from qat_lightning.quant.scheme import QuantScheme


def rebin(hist: torch.Tensor, old_max: float, new_max: float) -> torch.Tensor:
    """Spread counts over ``[0, old_max]`` onto the same bin count over ``[0, new_max]``
    (along the last dimension), linearly within each old bin."""
    bins = hist.shape[-1]
    cdf = torch.cat([hist.new_zeros(*hist.shape[:-1], 1), hist.cumsum(-1)], dim=-1)
    edges = torch.arange(bins + 1, dtype=torch.float64, device=hist.device) * (new_max / old_max)
    idx = edges.floor().clamp(max=bins - 1).long()
    frac = (edges - idx).clamp(max=1.0)
    at = cdf[..., idx] + frac * (cdf[..., idx + 1] - cdf[..., idx])
    at = torch.where(edges >= bins, cdf[..., -1:], at)
    return at.diff(dim=-1)


def add_to_histogram(
    hist: torch.Tensor, sums: torch.Tensor, hist_max: torch.Tensor, x: torch.Tensor
) -> None:
    """Count the finite values of ``x`` into ``hist`` (2, bins) over ``[0, hist_max]`` and
    add them (as magnitudes) to ``sums``, in place, growing the range first if ``x`` goes
    beyond it. ``sums / hist`` is each bin's mean, which the error searches use instead of the
    bin's centre: exact where a bin holds one distinct value."""
    values = x.detach().flatten()
    if not torch.isfinite(values).all():
        values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return
    bins = hist.shape[-1]
    magnitude = values.abs()
    old_max = float(hist_max)
    new_max = max(old_max, float(magnitude.max()), 1e-12)
    if new_max > old_max and old_max > 0:
        hist.copy_(rebin(hist, old_max, new_max))
        sums.copy_(rebin(sums, old_max, new_max))
    hist_max.fill_(new_max)
    # Bin of each value (magnitudes are >= 0, so truncation is floor); positives in row 1.
    index = (magnitude * (bins / new_max)).long().clamp_(max=bins - 1)
    index += (values >= 0).long() * bins
    hist.view(-1).add_(torch.bincount(index, minlength=2 * bins).to(hist))
    sums.view(-1).add_(torch.bincount(index, weights=magnitude, minlength=2 * bins).to(sums))


def signed_view(hist: torch.Tensor, hist_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts over ``[-max, max]`` in ascending order and their ``2 * bins + 1`` edges."""
    bins = hist.shape[-1]
    counts = torch.cat([hist[0].flip(0), hist[1]]).double().cpu()
    edges = torch.linspace(-hist_max, hist_max, 2 * bins + 1, dtype=torch.float64)
    return counts, edges


def bin_means(hist: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, counts)`` of the non-empty bins: each bin's mean value, in ascending order."""
    counts = torch.cat([hist[0].flip(0), hist[1]]).double().cpu()
    signed_sums = torch.cat([-sums[0].flip(0), sums[1]]).double().cpu()
    keep = counts > 0
    return signed_sums[keep] / counts[keep], counts[keep]


def magnitude_view(
    hist: torch.Tensor, hist_max: float, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of ``|x|`` (signed codes) or of ``x >= 0`` (unsigned) over ``[0, max]``."""
    counts = (hist.sum(0) if signed else hist[1]).double().cpu()
    return counts, torch.linspace(0.0, hist_max, hist.shape[-1] + 1, dtype=torch.float64)


def quantile(counts: torch.Tensor, edges: torch.Tensor, q: float) -> float:
    """The value below which a share ``q`` of the counts lies (linear within a bin)."""
    total = float(counts.sum())
    cdf = counts.cumsum(0)
    target = min(max(q * total, 1e-9 * total), total)  # q = 0: the first non-empty bin
    j = int(
        torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).clamp(max=len(cdf) - 1)
    )
    before = float(cdf[j] - counts[j])
    frac = 0.0 if counts[j] == 0 else min(max((target - before) / float(counts[j]), 0.0), 1.0)
    return float(edges[j] + frac * (edges[j + 1] - edges[j]))


def range_errors(
    centers: torch.Tensor,
    counts: torch.Tensor,
    mn: torch.Tensor,
    mx: torch.Tensor,
    scheme: QuantScheme,
) -> torch.Tensor:
    """Summed squared quantization error of the values ``centers`` (each ``counts`` times)
    under each candidate range ``[mn[k], mx[k]]``."""
    rows = scheme.replace(granularity="per_channel", axis=0, learnable=False, observer="minmax")
    scale, zero_point = encodings_from_range(mn, mx, rows)
    values = centers.float().expand(len(mn), -1)
    err = (fake_quantize(values, scale, zero_point, rows).double() - centers).pow(2)
    return (err * counts).sum(dim=1)


def search_ratio(
    errors: Callable[[torch.Tensor], torch.Tensor], points: int = 129, rounds: int = 4
) -> float:
    """The ratio in (0, 1] with least ``errors(ratios)``: a grid over (0, 1] (1 included, so
    the result is never worse than no clipping), then finer grids around the best point."""
    lo, hi = 0.0, 1.0
    best, best_err = 1.0, float("inf")
    for _ in range(rounds):
        ratios = torch.linspace(max(lo, 1e-4), hi, points, dtype=torch.float64)
        err = errors(ratios)
        i = int(err.argmin())
        if float(err[i]) < best_err:
            best, best_err = float(ratios[i]), float(err[i])
        step = float(ratios[1] - ratios[0])
        lo, hi = max(best - step, 0.0), min(best + step, 1.0)
    return best


def search_ratio_pair(
    errors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    points: int = 17,
    rounds: int = 5,
) -> tuple[float, float]:
    """Like `search_ratio` for two independent ratios (the low and the high end of a range)."""
    box = [(0.0, 1.0), (0.0, 1.0)]
    best, best_err = (1.0, 1.0), float("inf")
    for _ in range(rounds):
        lo = torch.linspace(max(box[0][0], 1e-4), box[0][1], points, dtype=torch.float64)
        hi = torch.linspace(max(box[1][0], 1e-4), box[1][1], points, dtype=torch.float64)
        grid_lo, grid_hi = torch.meshgrid(lo, hi, indexing="ij")
        err = errors(grid_lo.flatten(), grid_hi.flatten())
        i = int(err.argmin())
        if float(err[i]) < best_err:
            best, best_err = (
                (float(grid_lo.flatten()[i]), float(grid_hi.flatten()[i])),
                float(err[i]),
            )
        steps = (float(lo[1] - lo[0]), float(hi[1] - hi[0]))
        box = [(max(b - s, 0.0), min(b + s, 1.0)) for b, s in zip(best, steps, strict=True)]
    return best


def best_kl_bins(hist: torch.Tensor, levels: int) -> int:
    """The number of leading bins whose clip has least KL(reference || quantized), as
    TensorRT's entropy calibration: the search starts at 1/16 of the bins (so it can clip to
    1/16 of the observed maximum), coarse, then bin by bin around the best."""
    hist = hist.detach().double().cpu()
    bins = hist.numel()
    start = max(1, bins // 16)

    def kl(i: int) -> float:
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
        return float((p[support] * (p[support] / q[support].clamp(min=1e-12)).log()).sum())

    stride = max(1, (bins - start) // 128)
    coarse = list(range(start, bins + 1, stride))
    if coarse[-1] != bins:
        coarse.append(bins)
    best_i = min(coarse, key=kl)
    fine = range(max(start, best_i - stride + 1), min(bins, best_i + stride - 1) + 1)
    return min(fine, key=kl)
