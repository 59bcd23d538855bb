"""Make every rank's observers agree after calibration, so all ranks hold identical encodings.

Each observer's statistics are reduced in the way that matches what they mean: running min/max
with MIN/MAX, averaged statistics (EMA, percentile, MSE clip) with a mean, histograms by summing
after all ranks re-bin to the widest range.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qat_lightning.quant.histogram import rebin
from qat_lightning.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingMinMaxObserver,
    Observer,
)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    # gloo has no MIN/MAX for every dtype on every build; float32/64 are safe.
    dist.all_reduce(t, op=op)
    return t


def sync_observer(observer: Observer) -> None:
    """All-reduce one observer's statistics in place (no-op outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    # A rank that saw nothing holds +-inf, which MIN/MAX ignore and a mean must not.
    if isinstance(observer, (MinMaxObserver, HistogramObserver)):
        _all_reduce(observer.min_val, dist.ReduceOp.MIN)
        _all_reduce(observer.max_val, dist.ReduceOp.MAX)
    else:
        for name in ("min_val", "max_val"):
            buf = getattr(observer, name)
            finite = torch.isfinite(buf)
            total = _all_reduce(torch.where(finite, buf, torch.zeros_like(buf)), dist.ReduceOp.SUM)
            count = _all_reduce(finite.to(buf.dtype), dist.ReduceOp.SUM)
            buf.copy_(torch.where(count > 0, total / count.clamp(min=1), buf))
        if not isinstance(observer, MovingMinMaxObserver) and hasattr(observer, "batches"):
            _all_reduce(observer.batches, dist.ReduceOp.MAX)
    if isinstance(observer, HistogramObserver):  # pooled percentile, mse, histogram, entropy
        local_max = float(observer.histogram_max)
        global_max = _all_reduce(observer.histogram_max.clone(), dist.ReduceOp.MAX)
        for name in ("histogram", "histogram_sum"):  # counts, and the values' sums per bin
            buf = getattr(observer, name)
            if 0 < local_max < float(global_max):
                buf.copy_(rebin(buf, local_max, float(global_max)))
            _all_reduce(buf, dist.ReduceOp.SUM)
        observer.histogram_max.copy_(global_max)


def sync_observers(model: nn.Module) -> None:
    """`sync_observer` for every observer in ``model``."""
    for module in model.modules():
        if isinstance(module, Observer):
            sync_observer(module)
