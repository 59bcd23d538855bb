"""The per-tensor observer merge and encoding on the host (Python floats, float32 arithmetic)
against their tensor forms, bit for bit.

A per-tensor quantizer training on the CPU reads its batch's and running (min, max) in one
host sync; the running statistics, the scale and the zero point are then computed from those
floats (`Observer._host_merge`, `encoding_from_host_range`) instead of a dozen small tensor
ops. They must be the tensors' results exactly: every statistic, encoding, output and
gradient equal to a twin quantizer that takes the tensor path.
"""

import copy
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.functional import encodings_from_range
from qat_lightning.quant.host_float32 import encoding_from_host_range

FAST = settings(max_examples=200, deadline=None)


def _bits(t: torch.Tensor) -> list[int]:
    """The bit patterns of a float32 tensor (so that -0.0 and 0.0 differ)."""
    return t.detach().float().reshape(-1).view(torch.int32).tolist()


@st.composite
def schemes(draw):
    signed = draw(st.booleans())
    return QuantScheme(
        bits=draw(st.integers(2, 16)),
        symmetric=draw(st.booleans()),
        signed=signed,
        narrow_range=signed and draw(st.booleans()),
    )


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


LIMIT = _f32(1e37)
finite_f32 = st.floats(-LIMIT, LIMIT, allow_nan=False, width=32)
# ranges of every magnitude, tiny ones (scales clamped to eps) and zero included
magnitudes = st.one_of(
    finite_f32,
    st.floats(-_f32(1e-6), _f32(1e-6), width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0]),
)


@FAST
@given(scheme=schemes(), a=magnitudes, b=magnitudes)
def test_the_host_encoding_is_the_tensor_encoding(scheme, a, b):
    mn, mx = min(a, b), max(a, b)
    want_scale, want_zero = encodings_from_range(torch.tensor(mn), torch.tensor(mx), scheme)
    scale, zero_point = encoding_from_host_range(mn, mx, scheme)
    assert _bits(torch.tensor(scale)) == _bits(want_scale)
    assert zero_point == int(want_zero)
    assert scale == _f32(scale)  # a float32 value, as the buffer will hold it


@FAST
@given(
    scheme=schemes(),
    k=st.integers(0, 2**15),
    exponent=st.integers(-30, 30),
)
def test_zero_point_ties_round_to_even_as_the_tensors_do(scheme, k, exponent):
    """Ranges whose ``min / scale`` is exactly half-way between two integers."""
    scale = 2.0**exponent
    mn = -(k + 0.5) * scale
    mx = mn + (scheme.qmax - scheme.qmin) * scale
    want_scale, want_zero = encodings_from_range(torch.tensor(mn), torch.tensor(mx), scheme)
    assert encoding_from_host_range(mn, mx, scheme) == (float(want_scale), int(want_zero))


@FAST
@given(
    old=finite_f32,
    new=finite_f32,
    c=st.sampled_from([0.01, 0.1, 0.5, 0.3333, 1.0]),
    observer=st.sampled_from(["minmax", "moving_minmax"]),
)
def test_the_host_merge_is_the_tensor_merge(old, new, c, observer):
    scheme = QuantScheme(bits=8, observer=observer, averaging_constant=c)
    q = Quantizer(scheme)
    obs = q.observer
    if observer == "minmax":
        want_min = torch.minimum(torch.tensor(old), torch.tensor(new))
        want_max = torch.maximum(torch.tensor(old), torch.tensor(new))
    else:
        want_min = want_max = torch.tensor(old) + c * (torch.tensor(new) - torch.tensor(old))
    assert _bits(torch.tensor(obs._host_reduce(old, new, True))) == _bits(want_min)
    assert _bits(torch.tensor(obs._host_reduce(old, new, False))) == _bits(want_max)


def _tensor_path(q: Quantizer) -> Quantizer:
    """A copy of ``q`` whose observer merges with tensors (the path before this one)."""
    twin = copy.deepcopy(q)
    twin.observer._host_reduce = None
    return twin


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    observer=st.sampled_from(["minmax", "moving_minmax"]),
    symmetric=st.booleans(),
    bits=st.sampled_from([4, 8]),
    n=st.sampled_from([64, 5000]),  # below and above the vectorized fake quant's size
    shift=st.floats(-3, 3),
)
def test_a_training_quantizer_equals_its_tensor_path_twin(
    seed, observer, symmetric, bits, n, shift
):
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=bits, symmetric=symmetric, signed=symmetric, observer=observer)
    ours = Quantizer(scheme).train()
    with ours.compute_encodings():
        ours(torch.randn(n, generator=g))
    ours.enable_observer(True)
    twin = _tensor_path(ours)
    took_host_path = False
    for step in range(4):  # the range drifts and widens: clipping and in-range batches
        x = (torch.randn(n, generator=g) * (1 + step) + shift * step).requires_grad_()
        xt = x.detach().clone().requires_grad_()
        upstream = torch.randn(n, generator=g)
        y, yt = ours(x), twin(xt)
        took_host_path |= ours._host_encoding is not None
        assert twin._host_encoding is None
        y.backward(upstream)
        yt.backward(upstream)
        assert _bits(y) == _bits(yt)
        assert torch.equal(x.grad, xt.grad)
        for key, value in twin.state_dict().items():
            mine = ours.state_dict()[key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, key
            if value.is_floating_point():
                assert _bits(mine) == _bits(value), key
            else:
                assert torch.equal(mine, value), key
    assert took_host_path


@pytest.mark.parametrize("why", ["per_channel", "learnable", "non_finite", "huge"])
def test_the_tensor_path_runs_where_the_host_path_does_not_apply(why):
    kwargs = {"per_channel": dict(granularity="per_channel"), "learnable": dict(learnable=True)}
    scheme = QuantScheme(bits=8, **kwargs.get(why, {}))
    q = Quantizer(scheme, num_channels=4 if why == "per_channel" else None).train()
    with q.compute_encodings():
        q(torch.randn(4, 8))
    q.enable_observer(True)
    x = torch.randn(4, 8)
    if why == "non_finite":
        x[0, 0] = float("inf")
    if why == "huge":
        x[0, 0] = 2e38
    before = q.observer.max_val.clone()
    q(x)
    assert q._host_encoding is None  # the encoding came from tensors (a learnable one: LSQ)
    if why != "learnable":  # whose statistics may merge on the host: it has no use for them
        assert q.observer.host_range is None
    if why in ("non_finite", "huge"):  # the statistics still took the batch, as before
        assert float(q.observer.max_val) == max(float(before), float(x[torch.isfinite(x)].max()))


def test_update_encodings_reads_the_statistics_not_the_last_host_merge():
    """The host range describes one observation: statistics loaded (or reset) after it are
    what a later `update_encodings` encodes."""
    scheme = QuantScheme(bits=8, symmetric=False, signed=False)
    q = Quantizer(scheme).train()
    with q.compute_encodings():
        q(torch.randn(64))
    q.enable_observer(True)
    q(torch.randn(64))
    assert q._host_encoding is not None  # that call took the host path
    other = Quantizer(scheme)
    with other.compute_encodings():
        other(torch.randn(64) * 10 + 3)
    q.observer.load_state_dict(other.observer.state_dict())
    q.update_encodings()
    assert torch.equal(q.scale, other.scale) and torch.equal(q.zero_point, other.zero_point)
