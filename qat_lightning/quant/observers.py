"""Observers by name: `make_observer` gives the one a scheme's ``observer`` field names.

The min/max family and the `Observer` base are in `qat_lightning.quant.minmax`; the
calibrators that clip the range (percentile, MSE, histogram, entropy) in
`qat_lightning.quant.calibrators`. Per-channel (and per-group) ``percentile`` and ``mse``
compute each batch's range exactly and keep the mean over batches; per-tensor they pool every
calibration batch into one histogram.
"""

from __future__ import annotations

from qat_lightning.quant.calibrators import (
    BatchMSEObserver,
    BatchPercentileObserver,
    EntropyObserver,
    HistogramObserver,
    L2HistogramObserver,
    MSEObserver,
    PercentileObserver,
)
from qat_lightning.quant.minmax import (
    ChannelCountError,
    MinMaxObserver,
    MovingMinMaxObserver,
    NoObserver,
    Observer,
)
from qat_lightning.quant.scheme import QuantScheme

__all__ = [
    "OBSERVER_TYPES",
    "PER_CHANNEL_TYPES",
    "BatchMSEObserver",
    "BatchPercentileObserver",
    "ChannelCountError",
    "EntropyObserver",
    "HistogramObserver",
    "L2HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingMinMaxObserver",
    "NoObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

OBSERVER_TYPES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_minmax": MovingMinMaxObserver,
    "percentile": PercentileObserver,
    "batch_percentile": BatchPercentileObserver,
    "mse": MSEObserver,
    "histogram": L2HistogramObserver,
    "entropy": EntropyObserver,
}
# Per-channel statistics are per batch (a histogram per channel would cost bins x channels).
PER_CHANNEL_TYPES: dict[str, type[Observer]] = {
    "percentile": BatchPercentileObserver,
    "mse": BatchMSEObserver,
}


def make_observer(scheme: QuantScheme) -> Observer:
    """The observer ``scheme.observer`` names, in its per-tensor or per-channel (and
    per-group) form; `NoObserver` for a dynamic scheme."""
    if scheme.dynamic:
        return NoObserver(scheme)
    if (scheme.per_channel or scheme.per_group) and scheme.observer in PER_CHANNEL_TYPES:
        return PER_CHANNEL_TYPES[scheme.observer](scheme)
    return OBSERVER_TYPES[scheme.observer](scheme)
