"""Calibrating observers against worked examples with known optimal ranges: NVIDIA
pytorch-quantization's calibrator tests (inputs and expectations ported), torch.ao's
HistogramObserver as an oracle, and properties every clipping observer must keep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import QuantScheme, fake_quantize, make_observer
from qat_lightning.quant.functional import encodings_from_range


def _range(scheme: QuantScheme, *batches: torch.Tensor) -> tuple[float, float]:
    observer = make_observer(scheme)
    for batch in batches:
        observer(batch)
    mn, mx = observer.calculate_range()
    return float(mn.min()), float(mx.max())


def _amax(scheme: QuantScheme, *batches: torch.Tensor) -> float:
    mn, mx = _range(scheme, *batches)
    return max(-mn, mx)


def _outlier(value: float, outlier: float) -> torch.Tensor:
    x = torch.full((11, 7, 3, 3), value)
    x[1, 1, 1, 1] = outlier
    return x


# -- MSE: NVIDIA TestMSECalibrator -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("signed", "value", "outlier", "second"),
    [(True, 255.0, 256.0, False), (False, 512.0, 513.0, False), (True, 255.0, 256.0, True)],
    ids=["one-tensor", "unsigned-one-tensor", "two-tensors"],
)
def test_mse_picks_the_bulk_not_the_outlier(signed, value, outlier, second):
    # 692 values at 255 and one at 256: amax 255 has MSE 0.0014, amax 256 has 0.9986. The
    # old 41-ratio grid (0.02 apart) could only choose 256.
    batches = [_outlier(value, outlier)] + ([torch.full((11, 7, 3, 3), value)] if second else [])
    amax = _amax(QuantScheme(observer="mse", signed=signed), *batches)
    assert abs(amax - value) < abs(amax - outlier)
    assert abs(amax - value) < 0.01, amax


def test_per_channel_mse_picks_the_bulk_in_every_channel():
    x = torch.full((4, 99), 255.0)
    x[:, 0] = 256.0
    observer = make_observer(QuantScheme(observer="mse", granularity="per_channel"))
    observer(x)
    _, mx = observer.calculate_range()
    assert ((mx - 255.0).abs() < 0.05).all(), mx


# -- entropy: NVIDIA TestEntropyCalibrator ---------------------------------------------------------
def _uniform_with_outlier(seed: int) -> torch.Tensor:
    x = torch.rand(11, 7, 3, 3, generator=torch.Generator().manual_seed(seed))
    x[1, 1, 1, 1] = 10.0
    return x


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("tensors", [1, 2])
def test_entropy_discards_one_outlier_of_ten_times_the_data(signed, tensors):
    # Uniform(0, 1) with one 10: the KL search must clip near 1. Searching only from as many
    # bins as levels it could not clip below 10/8 = 1.25 (unsigned).
    batches = [_uniform_with_outlier(0)]
    if tensors == 2:
        batches.append(torch.rand(11, 7, 3, 3, generator=torch.Generator().manual_seed(1)))
    amax = _amax(QuantScheme(observer="entropy", signed=signed), *batches)
    assert 0.9 < amax < 1.1, amax


# -- percentile: NVIDIA TestPercentileCalibrator ---------------------------------------------------
@pytest.mark.parametrize(
    ("signed", "percentile", "expected", "tolerance"),
    [(True, 90.0, 89.0, 100 / 1024), (False, 80.0, 79.0, 100 / 2048)],
    ids=["signed", "unsigned"],
)
def test_percentile_of_one_tensor(signed, percentile, expected, tolerance):
    scheme = QuantScheme(observer="percentile", percentile=percentile, signed=signed)
    assert abs(_amax(scheme, torch.arange(100.0)) - expected) < tolerance


def test_percentile_pools_all_calibration_batches():
    # The 99th percentile of [0..99] and [0, 0.5, .., 49.5] together is ~97; the mean of the
    # two batches' percentiles (what the observer used to return) is 73.5.
    batches = (torch.arange(100.0), torch.arange(0, 50, 0.5))
    pooled = _amax(QuantScheme(observer="percentile", percentile=99), *batches)
    assert abs(pooled - 97.0) < 100 / 1024
    per_batch = _amax(QuantScheme(observer="batch_percentile", percentile=99), *batches)
    assert per_batch == pytest.approx((98.0 + 49.0) / 2)


def test_affine_percentile_clips_each_tail_of_the_pooled_data():
    # 1000 values -500..499 in two batches: the 1st and 99th percentiles are ~-490 and ~489.
    values = torch.arange(-500.0, 500.0)
    scheme = QuantScheme(observer="percentile", percentile=99, symmetric=False)
    lo, hi = _range(scheme, values[::2], values[1::2])
    assert abs(lo + 490) < 1.0 and abs(hi - 489) < 1.0, (lo, hi)


# -- histogram (L2) against torch.ao's HistogramObserver -------------------------------------------
def _data_mse(x: torch.Tensor, lo: float, hi: float, scheme: QuantScheme) -> float:
    scale, zero_point = encodings_from_range(torch.tensor(lo), torch.tensor(hi), scheme)
    return float((fake_quantize(x, scale, zero_point, scheme) - x).pow(2).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_observer_is_at_least_as_good_as_torch_ao(seed):
    # Skewed data (a ReLU-like bulk with a long positive tail and a short negative one):
    # the low and the high end should clip differently.
    from torch.ao.quantization import HistogramObserver as TorchHistogramObserver

    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(20_000, generator=g).abs(), -0.2 * torch.rand(5_000, generator=g)])
    x = torch.cat([x, torch.tensor([25.0, 18.0, -1.5])])
    scheme = QuantScheme(bits=8, symmetric=False, signed=False, observer="histogram")
    lo, hi = _range(scheme, x)
    theirs = TorchHistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    theirs(x)
    scale, zero_point = theirs.calculate_qparams()
    their_mse = float(
        (torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255) - x)
        .pow(2)
        .mean()
    )
    ours = _data_mse(x, lo, hi, scheme)
    assert ours <= 1.02 * their_mse, (ours, their_mse)
    assert ours < _data_mse(x, float(x.min()), float(x.max()), scheme)


# -- properties of every clipping observer ---------------------------------------------------------
CLIPPING = ["percentile", "batch_percentile", "mse", "histogram", "entropy"]
values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=64).filter(
    lambda v: max(v) > min(v)
)


@settings(max_examples=25, deadline=None)
@given(values=values, observer=st.sampled_from(CLIPPING), symmetric=st.booleans())
def test_the_chosen_range_lies_inside_the_observed_one(values, observer, symmetric):
    x = torch.tensor(values)
    scheme = QuantScheme(bits=4, observer=observer, symmetric=symmetric)
    lo, hi = _range(scheme, x[: len(x) // 2], x[len(x) // 2 :])
    if symmetric:  # the range is [-amax, amax]
        assert max(-lo, hi) <= float(x.abs().max())
    else:
        assert float(x.min()) <= lo <= hi <= float(x.max())


@settings(max_examples=25, deadline=None)
@given(
    values=values,
    observer=st.sampled_from(["mse", "histogram"]),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["per_tensor", "per_channel"]),
)
def test_mse_observers_never_do_worse_than_minmax(values, observer, symmetric, granularity):
    if granularity == "per_channel" and observer == "histogram":
        return  # no per-channel form
    x = torch.tensor(values).reshape(1, -1)
    scheme = QuantScheme(bits=4, observer=observer, symmetric=symmetric, granularity=granularity)
    lo, hi = _range(scheme, x)
    minmax = _range(scheme.replace(observer="minmax", granularity="per_tensor"), x)
    plain = scheme.replace(observer="minmax", granularity="per_tensor")
    # The search runs on the histogram's bin means: exact where a bin holds one distinct
    # value, off by less than a bin (max|x| / 2048) otherwise.
    bin_width = float(x.abs().max()) / 2048
    assert _data_mse(x, lo, hi, plain) <= _data_mse(x, *minmax, plain) * (1 + 1e-6) + bin_width**2
