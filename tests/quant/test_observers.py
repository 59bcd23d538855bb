"""Observers: robust to non-finite and all-zero input, and each one's range where it can be
worked out (min/max, EMA, percentile 100), or compared (clipping beats min/max on heavy tails).
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import Quantizer, QuantScheme, make_observer
from qat_lightning.quant.functional import EPS
from qat_lightning.quant.scheme import HISTOGRAM_OBSERVERS, OBSERVERS

CASES = [
    (observer, symmetric, granularity)
    for observer in OBSERVERS
    for symmetric in (True, False)
    for granularity in ("per_tensor", "per_channel")
    if not (granularity == "per_channel" and observer in HISTOGRAM_OBSERVERS)
]


def _scheme(observer: str, symmetric: bool, granularity: str, **kw) -> QuantScheme:
    return QuantScheme(
        observer=observer, symmetric=symmetric, granularity=granularity, axis=1, **kw
    )


def _calibrate(scheme: QuantScheme, *batches: torch.Tensor) -> Quantizer:
    q = Quantizer(scheme)
    with q.compute_encodings():
        for batch in batches:
            q(batch)
    return q


def _assert_sane(q: Quantizer, channels: int | None) -> None:
    scale, zero_point = q.encoding()
    assert bool(torch.isfinite(scale).all()), scale
    assert bool((scale >= EPS).all()), scale
    assert int(zero_point.min()) >= q.scheme.qmin and int(zero_point.max()) <= q.scheme.qmax
    if channels is not None:
        assert scale.shape == (channels,)
    assert q.is_initialized
    y = q(torch.randn(3, 4, 5))
    assert bool(torch.isfinite(y).all())


def _with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = float("-inf")
    return x


@pytest.mark.parametrize(("observer", "symmetric", "granularity"), CASES)
def test_survives_nan_inf_and_zeros(observer, symmetric, granularity):
    scheme = _scheme(observer, symmetric, granularity)
    channels = 4 if scheme.per_channel else None
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    cases = {
        "nan_inf_mixed": [_with_nonfinite(x)],
        "all_zero": [torch.zeros(3, 4, 5)],
        "zero_then_nan": [torch.zeros(3, 4, 5), _with_nonfinite(x)],
        "nan_between": [x, torch.full((3, 4, 5), float("nan")), x],
    }
    for name, batches in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-zero data warns (tested in test_quantizer)
            q = _calibrate(scheme, *batches)
        try:
            _assert_sane(q, channels)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@pytest.mark.parametrize(("observer", "symmetric", "granularity"), CASES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_only_batch_leaves_the_range_where_it_was(
    observer, symmetric, granularity, fill
):
    # Issue 12 item 10: an all-NaN batch used to be merged as the range [0, 0] (moving
    # averages shrank, scales moved by 15 %). It says nothing about the range: skip it.
    scheme = _scheme(observer, symmetric, granularity)
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5) + 1.0
    ref = _calibrate(scheme, x, x)
    skipped = _calibrate(scheme, x, torch.full((3, 4, 5), fill), x)
    for ours, theirs in zip(skipped.encoding(), ref.encoding(), strict=True):
        assert torch.equal(ours, theirs)
    alone = _calibrate(scheme, torch.full((3, 4, 5), fill))
    assert not alone.observer.has_data and not alone.is_initialized


@pytest.mark.parametrize(("observer", "symmetric", "granularity"), CASES)
def test_an_empty_tensor_is_skipped(observer, symmetric, granularity):
    scheme = _scheme(observer, symmetric, granularity)
    torch.manual_seed(5)
    x = torch.randn(3, 4, 5)
    ref = _calibrate(scheme, x)
    with_empty = _calibrate(scheme, torch.empty(0, 4), x, torch.empty(0, 4, 5))
    for ours, theirs in zip(with_empty.encoding(), ref.encoding(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_per_channel_channel_with_nothing_finite_keeps_its_range():
    scheme = QuantScheme(observer="moving_minmax", granularity="per_channel", axis=1)
    q = _calibrate(scheme, torch.tensor([[2.0, -1.0]]), torch.tensor([[float("nan"), 1.0]]))
    assert q.observer.min_val[0] == 2.0 and q.observer.max_val[0] == 2.0


@pytest.mark.parametrize("observer", ["minmax", "moving_minmax"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_minmax_ignores_nonfinite_values(observer, symmetric, granularity):
    # The encoding from data with NaN/Inf mixed in is the encoding of its finite part (the
    # clean reference stands them as 0, which every encoding's range includes anyway).
    scheme = _scheme(observer, symmetric, granularity)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5) + 0.5
    dirty = _with_nonfinite(x)
    clean = torch.where(torch.isfinite(dirty), dirty, torch.zeros(()))
    scale, zero_point = _calibrate(scheme, dirty).encoding()
    ref_scale, ref_zero_point = _calibrate(scheme, clean).encoding()
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zero_point, ref_zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_percentile_100_equals_minmax(symmetric, granularity):
    torch.manual_seed(2)
    x = torch.randn(6, 4, 50) * 3 + 1
    ref = _calibrate(_scheme("minmax", symmetric, granularity), x)
    pct = _calibrate(_scheme("percentile", symmetric, granularity, percentile=100), x)
    if not symmetric:  # a symmetric percentile observer keeps [-amax, amax]
        assert torch.equal(pct.observer.min_val, ref.observer.min_val)
        assert torch.equal(pct.observer.max_val, ref.observer.max_val)
    for ours, theirs in zip(pct.encoding(), ref.encoding(), strict=True):
        assert torch.equal(ours, theirs)


def test_batch_percentile_averages_over_batches():
    # batch_percentile keeps the mean of the per-batch ranges, not the extreme one.
    obs = make_observer(QuantScheme(observer="batch_percentile", percentile=100, symmetric=False))
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-3.0, 4.0]))
    assert float(obs.min_val) == -2.0 and float(obs.max_val) == 3.0
    assert int(obs.batches) == 2


def test_moving_minmax_ema_by_hand():
    # c = 0.25. Batch 1 sets [-1, 2]. Batch 2 has [-5, 6]:
    #   min = -1 + 0.25 * (-5 - -1) = -2,  max = 2 + 0.25 * (6 - 2) = 3.
    # Batch 3 has [-2, 7]: min = -2 + 0.25 * 0 = -2, max = 3 + 0.25 * (7 - 3) = 4.
    # Symmetric 8-bit: amax = 4, scale = 4 / 127.
    scheme = QuantScheme(observer="moving_minmax", averaging_constant=0.25)
    q = _calibrate(
        scheme,
        torch.tensor([-1.0, 0.5, 2.0]),
        torch.tensor([-5.0, 6.0]),
        torch.tensor([-2.0, 7.0]),
    )
    assert float(q.observer.min_val) == -2.0
    assert float(q.observer.max_val) == 4.0
    assert torch.equal(q.encoding()[0], torch.tensor(4.0) / 127)


def test_moving_minmax_per_channel_ema_by_hand():
    # Per channel (axis 1), c = 0.5. Channel 0 sees 2 then 4: min = max = 2 + 0.5 * 2 = 3.
    # Channel 1 sees -1 then 1: min = max = -1 + 0.5 * 2 = 0.
    # Symmetric: amax 3 -> scale 3/127; amax 0 -> the smallest scale, float32 eps.
    scheme = QuantScheme(
        observer="moving_minmax", averaging_constant=0.5, granularity="per_channel", axis=1
    )
    q = _calibrate(scheme, torch.tensor([[2.0, -1.0]]), torch.tensor([[4.0, 1.0]]))
    assert q.observer.min_val.tolist() == [3.0, 0.0]
    assert q.observer.max_val.tolist() == [3.0, 0.0]
    assert torch.equal(q.encoding()[0], torch.stack([torch.tensor(3.0) / 127, torch.tensor(EPS)]))


def _heavy_tailed(channels: int, per_channel: int) -> torch.Tensor:
    """Laplace(0, 1) samples with one large outlier per channel (|x| = 60)."""
    g = torch.Generator().manual_seed(3)
    u = torch.rand(channels, per_channel, generator=g) - 0.5
    x = -u.sign() * torch.log1p(-2 * u.abs())
    x[:, 0] = 60.0 * torch.tensor([1.0, -1.0]).repeat(channels)[:channels]
    return x


CLIPPING = [
    (observer, symmetric, granularity)
    for observer in ("percentile", "mse", "entropy")
    for symmetric in (True, False)
    for granularity in ("per_tensor", "per_channel")
    if not (granularity == "per_channel" and observer in HISTOGRAM_OBSERVERS)
]


@pytest.mark.parametrize(("observer", "symmetric", "granularity"), CLIPPING)
def test_clipping_observers_beat_minmax_on_heavy_tails(observer, symmetric, granularity):
    # 4 bits, Laplace data with outliers: min/max spends the code range on the outliers.
    x = _heavy_tailed(4, 10_000)
    scheme = QuantScheme(
        bits=4, symmetric=symmetric, granularity=granularity, axis=0, observer=observer
    )
    clip = _calibrate(scheme, x)
    ref = _calibrate(scheme.replace(observer="minmax"), x)
    clip_scale, clip_zp = clip.encoding()
    ref_scale, ref_zp = ref.encoding()
    # The clipped range lies inside the min/max range.
    lo, hi = (scheme.qmin - clip_zp) * clip_scale, (scheme.qmax - clip_zp) * clip_scale
    ref_lo, ref_hi = (scheme.qmin - ref_zp) * ref_scale, (scheme.qmax - ref_zp) * ref_scale
    assert bool((hi - lo <= ref_hi - ref_lo).all())
    assert bool((clip_scale <= ref_scale).all())
    # And quantizes with lower error.
    mse = (clip(x) - x).pow(2).mean()
    ref_mse = (ref(x) - x).pow(2).mean()
    assert float(mse) < 0.5 * float(ref_mse), (float(mse), float(ref_mse))


def test_entropy_histogram_keeps_every_count_when_range_grows():
    obs = make_observer(QuantScheme(observer="entropy"))
    obs(torch.linspace(-1, 1, 1000))
    obs(torch.linspace(-10, 10, 500))
    obs(torch.tensor([float("nan"), 3.0]))
    assert float(obs.histogram_max) == 10.0
    torch.testing.assert_close(float(obs.histogram.sum()), 1501.0)


def test_observer_reset_forgets():
    for observer in OBSERVERS:
        obs = make_observer(QuantScheme(observer=observer))
        obs(torch.randn(100))
        assert obs.has_data
        obs.reset()
        assert not obs.has_data, observer
        mn, mx = obs.calculate_range()
        assert float(mn) == 0.0 and float(mx) == 0.0


_SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 0.0])


@settings(max_examples=40, deadline=None)
@given(
    observer=st.sampled_from(["minmax", "moving_minmax", "percentile", "histogram"]),
    granularity=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    seed=st.integers(0, 2**31 - 1),
    specials=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 23), _SPECIAL), max_size=5),
)
def test_the_one_sync_merge_equals_the_general_one(observer, granularity, seed, specials):
    """Finite batches take a shortcut (one host sync); its statistics must be those of the
    general, non-finite-aware merge, bit for bit, also after batches that were not finite."""
    if granularity != "per_tensor" and observer in HISTOGRAM_OBSERVERS:
        observer = "minmax"
    group = {"group_size": 4} if granularity == "per_group" else {}
    scheme = QuantScheme(observer=observer, granularity=granularity, axis=0, **group)
    fast, general = make_observer(scheme), make_observer(scheme)
    general._merge_if_finite = lambda *args: False  # always the general path
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randn(3, 8, generator=generator) * 10 for _ in range(4)]
    for batch, index, value in specials:
        batches[batch].view(-1)[index] = value
    for batch in batches:
        fast(batch)
        general(batch)
        for name in ("min_val", "max_val"):
            a, b = getattr(fast, name), getattr(general, name)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert fast.has_data == general.has_data
