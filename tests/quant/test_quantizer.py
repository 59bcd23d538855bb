"""Quantizer as a module: calibration lifecycle, checkpoints, copies and casts, LSQ training."""

import copy
import io
import warnings

import pytest
import torch

from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.functional import EPS
from qat_lightning.quant.quantizer import label_quantizers, warn_only_zeros

CHANNELS = 4  # along axis 1 of the (3, 4, 5) test tensors

# Schemes whose whole state must survive a checkpoint: lazily sized per-channel buffers,
# running observer statistics (EMA, batch means, histograms), learnable parameters.
CHECKPOINTED = {
    "per_tensor_minmax": QuantScheme(),
    "per_channel_minmax": QuantScheme(granularity="per_channel", axis=1),
    "moving_minmax_affine": QuantScheme(observer="moving_minmax", symmetric=False, signed=False),
    "per_channel_moving": QuantScheme(granularity="per_channel", axis=1, observer="moving_minmax"),
    "percentile": QuantScheme(observer="percentile", percentile=99.0),
    "per_channel_mse": QuantScheme(granularity="per_channel", axis=1, observer="mse", bits=4),
    "entropy": QuantScheme(observer="entropy", bits=6),
    "histogram_affine": QuantScheme(observer="histogram", symmetric=False, bits=4),
    "batch_percentile": QuantScheme(observer="batch_percentile", percentile=99.0),
    "learnable_affine": QuantScheme(learnable=True, symmetric=False, bits=4),
    "learnable_per_channel": QuantScheme(learnable=True, granularity="per_channel", axis=1),
    "fixed_point": QuantScheme(representation="fixed_point", frac_bits=5),
}


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, CHANNELS, 5, generator=g) * (1 + i) for i in range(n)]


def _make(scheme: QuantScheme) -> Quantizer:
    channels = CHANNELS if scheme.per_channel and scheme.learnable else None
    return Quantizer(scheme, num_channels=channels)


def _trained(scheme: QuantScheme) -> Quantizer:
    """Calibrated, then a few QAT steps (observer on for a non-learnable scheme, SGD on the
    scale of a learnable one), so every piece of state has moved from its initial value."""
    q = _make(scheme)
    with q.compute_encodings():
        for x in _batches(2):
            q(x)
    if scheme.learnable:
        opt = torch.optim.SGD(q.parameters(), lr=0.01)
        for x in _batches(3, seed=1):
            opt.zero_grad()
            (q(x) - x * 0.9).pow(2).sum().backward()
            opt.step()
    else:
        q.enable_observer(True)
        for x in _batches(2, seed=1):
            q(x)
    return q


def _assert_same_behaviour(a: Quantizer, b: Quantizer) -> None:
    """Same state, and the same outputs while both keep observing."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
        assert sa[key].dtype == sb[key].dtype, key
    for x in _batches(3, seed=2):
        assert torch.equal(a(x), b(x))
    for x in _batches(1, seed=3):
        assert torch.equal(a.quantize(x).codes, b.quantize(x).codes)


@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
def test_state_dict_round_trip_into_fresh_quantizer(name):
    scheme = CHECKPOINTED[name]
    q = _trained(scheme)
    fresh = _make(scheme)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized
    _assert_same_behaviour(q, fresh)


@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
def test_checkpoint_file_round_trip_weights_only(name):
    scheme = CHECKPOINTED[name]
    q = _trained(scheme)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = _make(scheme)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_same_behaviour(q, fresh)


@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
def test_deepcopy_behaves_identically(name):
    q = _trained(CHECKPOINTED[name])
    _assert_same_behaviour(q, copy.deepcopy(q))


@pytest.mark.parametrize("name", sorted(CHECKPOINTED))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_cast_keeps_encodings_and_outputs(name, dtype):
    # Casting a model (.double(), .half(), Lightning "16-true") must not round the encoding
    # or the observer statistics: the quantizer keeps its float32 state and its outputs.
    q = _trained(CHECKPOINTED[name])
    _assert_same_behaviour(copy.deepcopy(q), copy.deepcopy(q).to(dtype))
    # On inputs of the cast dtype, the cast quantizer acts as the original one does.
    x = _batches(1, seed=4)[0].to(dtype)
    y = copy.deepcopy(q).to(dtype)(x)
    assert y.dtype == dtype
    assert torch.equal(y, q(x))


def test_compute_encodings_lifecycle():
    q = Quantizer(QuantScheme(bits=4, symmetric=False))
    assert int(q.initialized) == 0 and not q.is_initialized
    g = torch.Generator().manual_seed(8)
    with q.compute_encodings():
        x = torch.randn(3, 4, 5, generator=g) * 2
        assert torch.equal(q(x), x)  # observing only: no fake quant inside the block
        assert int(q.initialized) == 0
        q(torch.randn(3, 4, 5, generator=g) * 3)
    assert int(q.initialized) == 1 and q.is_initialized
    assert int(q.observer_enabled) == 0 and int(q.fake_quant_enabled) == 1
    encoding = [t.clone() for t in q.encoding()]
    # Further inputs, even far out of range, leave the encoding alone.
    big = torch.randn(3, 4, 5, generator=g) * 100
    y = q(big)
    for before, after in zip(encoding, q.encoding(), strict=True):
        assert torch.equal(before, after)
    # ... and are fake-quantized: on the grid, clipped to the calibrated range.
    assert torch.equal(q(y), y)
    scale, zero_point = encoding
    assert float(y.max()) <= float((q.scheme.qmax - zero_point) * scale) + 1e-6
    assert len(torch.unique(y)) <= 2**4


def test_compute_encodings_again_recalibrates_from_scratch():
    q = Quantizer(QuantScheme())
    with q.compute_encodings():
        q(torch.tensor([-100.0, 100.0]))
    with q.compute_encodings():
        q(torch.tensor([-1.0, 1.0]))
    assert torch.equal(q.encoding()[0], torch.tensor(1.0) / 127)


def test_qat_mode_updates_encodings_every_step():
    q = Quantizer(QuantScheme(observer="minmax"))
    q(torch.tensor([-1.0, 1.0]))  # observer and fake quant both on by default
    assert q.is_initialized
    assert torch.equal(q.encoding()[0], torch.tensor(1.0) / 127)
    q(torch.tensor([-2.0, 0.5]))
    assert torch.equal(q.encoding()[0], torch.tensor(2.0) / 127)


def test_fixed_point_is_initialized_at_construction():
    q = Quantizer(QuantScheme(representation="fixed_point", frac_bits=3, bits=6))
    assert int(q.initialized) == 1
    assert float(q.encoding()[0]) == 2.0**-3
    assert float(q(torch.tensor(0.3))) == 0.25  # round(0.3 * 8) = 2 -> 2/8


def test_uncalibrated_is_not_initialized():
    schemes = (QuantScheme(), QuantScheme(granularity="per_channel"), QuantScheme(learnable=True))
    for scheme in schemes:
        assert int(Quantizer(scheme).initialized) == 0


def test_learnable_per_channel_needs_num_channels():
    with pytest.raises(ValueError, match="num_channels"):
        Quantizer(QuantScheme(learnable=True, granularity="per_channel"))


def test_parameters_only_when_learnable():
    assert list(Quantizer(QuantScheme()).parameters()) == []
    symmetric = Quantizer(QuantScheme(learnable=True))
    assert [p.requires_grad for p in symmetric.parameters()] == [True, False]  # scale, zp
    affine = Quantizer(QuantScheme(learnable=True, symmetric=False))
    assert [p.requires_grad for p in affine.parameters()] == [True, True]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_finite_and_nonzero(symmetric, per_channel):
    scheme = QuantScheme(
        bits=4,
        learnable=True,
        symmetric=symmetric,
        granularity="per_channel" if per_channel else "per_tensor",
        axis=1,
    )
    q = _make(scheme)
    g = torch.Generator().manual_seed(5)
    with q.compute_encodings():
        q(torch.randn(8, CHANNELS, 16, generator=g))
    # Wider than the calibration data, so some values clip (the zero point's LSQ gradient
    # comes from the clipped ones).
    x = (torch.randn(8, CHANNELS, 16, generator=g) * 1.5).requires_grad_()
    target = torch.randn(8, CHANNELS, 16, generator=g)
    (q(x) - target).pow(2).sum().backward()
    assert bool(torch.isfinite(q.scale.grad).all())
    assert bool((q.scale.grad != 0).all()), q.scale.grad
    assert q.scale.grad.shape == q.scale.shape
    if symmetric:
        assert q.zero_point.grad is None
    else:
        assert bool(torch.isfinite(q.zero_point.grad).all())
        assert bool((q.zero_point.grad != 0).any()), q.zero_point.grad
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("per_channel", [False, True])
def test_learnable_scale_stays_positive_under_sgd(per_channel):
    # Everything clips high, so the loss (q(x)^2) pushes the scale down; a large learning
    # rate overshoots zero. The scale in use never goes below float32 eps, outputs stay finite.
    scheme = QuantScheme(
        learnable=True, granularity="per_channel" if per_channel else "per_tensor", axis=1
    )
    q = _make(scheme)
    with q.compute_encodings():
        q(torch.randn(3, CHANNELS, 5, generator=torch.Generator().manual_seed(6)))
    opt = torch.optim.SGD(q.parameters(), lr=100.0)
    x = torch.full((3, CHANNELS, 5), 50.0)
    went_negative = False
    for _ in range(5):
        opt.zero_grad()
        y = q(x)
        assert bool(torch.isfinite(y).all())
        assert bool((q.scale > 0).all())
        y.pow(2).sum().backward()
        opt.step()
        went_negative |= bool((q.scale <= 0).any())
        assert bool((q.encoding()[0] >= EPS).all())
        assert bool(torch.isfinite(q.quantize(x).dequantize()).all())
    assert went_negative  # the test did push the raw parameter through zero
    q(x)
    assert bool((q.scale >= EPS).all())


def test_bfloat16_input_fake_quant_returns_bfloat16():
    for scheme in (QuantScheme(), QuantScheme(granularity="per_channel", axis=1)):
        q = Quantizer(scheme)
        x = torch.randn(3, CHANNELS, 5, generator=torch.Generator().manual_seed(7)).bfloat16()
        with q.compute_encodings():
            q(x)
        y = q(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, q(x.float()).bfloat16())
        assert torch.equal(q.quantize(x).codes, q.quantize(x.float()).codes)


def test_extra_repr_names_the_scheme():
    text = repr(Quantizer(QuantScheme(bits=4, representation="fixed_point", frac_bits=2)))
    assert "4-bit sym Q2.2" in text


def test_eval_mode_never_moves_encodings_but_compute_encodings_observes():
    quantizer = Quantizer(QuantScheme(bits=8, observer="moving_minmax"))
    quantizer.eval()
    with quantizer.compute_encodings():  # calibrating in eval mode still observes
        quantizer(torch.linspace(-2.0, 2.0, 101))
    assert quantizer.is_initialized
    quantizer.enable_observer(True)
    scale = quantizer.scale.clone()
    quantizer(torch.full((10,), 50.0))  # serving: the encoding stays put
    assert torch.equal(quantizer.scale, scale)
    quantizer.train()
    quantizer(torch.full((10,), 50.0))  # training with the observer on: it moves
    assert quantizer.scale > scale


# -- misuse ends in one clear message (issue 12 item 10) -------------------------------------------
def _labelled(scheme: QuantScheme, **kwargs) -> Quantizer:
    holder = torch.nn.ModuleDict({"act": Quantizer(scheme, **kwargs)})
    label_quantizers(holder)
    return holder["act"]


def test_a_channel_count_change_inside_compute_encodings_names_quantizer_and_shapes():
    q = _labelled(QuantScheme(granularity="per_channel", axis=1))
    error = r"'act'.*\(4,\).*\(3, 8, 5\) with 8"
    with pytest.raises(ValueError, match=error), q.compute_encodings():
        q(torch.randn(3, 4, 5))
        q(torch.randn(3, 8, 5))  # used to restart the statistics, dropping the first batch


def test_a_learnable_per_channel_scale_is_never_resized():
    q = _labelled(QuantScheme(granularity="per_channel", axis=1, learnable=True), num_channels=4)
    scale = q.scale
    error = r"'act'.*learnable scale.*\(4,\).*\(8,\)"
    with pytest.raises(ValueError, match=error), q.compute_encodings():
        q(torch.randn(3, 8, 5))
    assert q.scale is scale and q.scale.shape == (4,)


def test_quantizing_before_calibration_warns_once():
    q = Quantizer(QuantScheme()).eval()
    with pytest.warns(UserWarning, match="before any calibration"):
        q(torch.randn(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.randn(8))
        q.quantize(torch.randn(8))


def test_a_calibrated_quantizer_never_warns():
    q = Quantizer(QuantScheme())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with q.compute_encodings():
            q(torch.randn(8))
        q(torch.randn(8))
        q.quantize(torch.randn(8))


def test_all_zero_calibration_warns_naming_the_quantizer():
    q = _labelled(QuantScheme())
    with pytest.warns(UserWarning, match=r"all-zero data.*'act'"), q.compute_encodings():
        q(torch.zeros(8))
    assert float(q.scale) == EPS  # the encoding itself is as before: the smallest scale


def test_all_zero_helper_lists_every_such_quantizer_in_one_warning():
    named = []
    for name, data in (("a", torch.zeros(4)), ("b", torch.randn(4)), ("c", torch.zeros(4))):
        q = Quantizer(QuantScheme())
        q.observer(data)
        q.update_encodings()
        named.append((name, q))
    with pytest.warns(UserWarning) as record:
        assert warn_only_zeros(named) == ["a", "c"]
    assert len(record) == 1 and "2 quantizer(s)" in str(record[0].message)
    assert "a, c" in str(record[0].message)
