"""The vectorized CPU fake quant (`quant.cpu_fake_quant`) against ATen's kernel, bit for bit.

Values and input gradients must equal `torch.fake_quantize_per_tensor_affine`'s for every
scale, zero point and code range the path takes, on ties, the ends of the in-range interval,
NaN, infinities and inputs far outside the range; where the path does not apply, or its
probe disagrees, ATen's kernel runs.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.quant import Quantizer, QuantScheme, cpu_fake_quant
from qat_lightning.quant.cpu_fake_quant import fake_quantize_per_tensor
from qat_lightning.quant.host_float32 import f32 as _f32
from qat_lightning.quant.host_float32 import in_range_interval
from qat_lightning.quant.host_float32 import next_f32 as _next_f32

FAST = settings(max_examples=60, deadline=None)
RANGES = [(0, 255), (-128, 127), (0, 15), (-8, 7), (0, 1)]


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    """Take the path at every size, so small hypothesis examples exercise it."""
    monkeypatch.setattr(cpu_fake_quant, "MIN_NUMEL", 0)


@st.composite
def encodings(draw):
    qmin, qmax = draw(st.sampled_from(RANGES))
    scale = _f32(10 ** draw(st.floats(-6, 3)))
    zero_point = draw(st.integers(qmin, qmax))  # affine signed schemes too
    return scale, zero_point, qmin, qmax


def _inputs(seed: int, n: int, scale: float, zero_point: int, qmin: int, qmax: int):
    g = torch.Generator().manual_seed(seed)
    low, high = qmin - zero_point, qmax - zero_point
    lo, hi = in_range_interval(scale, zero_point, qmin, qmax)
    k = torch.randint(low - 3, high + 4, (n,), generator=g).float()
    parts = [
        (torch.randn(n, generator=g) * (high - low + 1) / 2 + (high + low) / 2) * scale,
        (k + 0.5) * scale,  # ties (rounded to float32: near-ties too)
        torch.tensor(
            [
                lo,
                hi,
                _next_f32(lo, False),
                _next_f32(hi, True),
                _next_f32(lo, True),
                _next_f32(hi, False),
                0.0,
                -0.0,
            ]
        ),
        torch.tensor([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e-40]),
    ]
    x = torch.cat(parts)
    return x[torch.randperm(x.numel(), generator=g)]


def _aten(x, scale, zero_point, qmin, qmax, upstream):
    x = x.clone().requires_grad_()
    y = torch.fake_quantize_per_tensor_affine(
        x, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qmin, qmax
    )
    y.backward(upstream)
    return y.detach(), x.grad


@FAST
@given(enc=encodings(), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000))
def test_values_and_gradients_equal_atens(enc, seed, n):
    scale, zero_point, qmin, qmax = enc
    x = _inputs(seed, n, *enc)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    want, want_grad = _aten(x, *enc, upstream)
    xr = x.clone().requires_grad_()
    y = fake_quantize_per_tensor(
        xr, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qmin, qmax
    )
    assert y is not None  # the path was taken
    y.backward(upstream)
    assert torch.equal(y, want)
    assert torch.equal(xr.grad, want_grad)
    # Without autograd (eval-mode fake quant) the values are the same.
    with torch.no_grad():
        y = fake_quantize_per_tensor(
            x, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qmin, qmax
        )
    assert torch.equal(y, want)


@FAST
@given(
    enc=encodings(), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000), inside=st.booleans()
)
def test_a_known_batch_range_gives_the_same_values_and_gradients(enc, seed, n, inside):
    """The observer's (min, max) of the batch lets the path skip clipping when nothing is
    outside; with or without that shortcut the result is ATen's."""
    scale, zero_point, qmin, qmax = enc
    x = _inputs(seed, n, *enc)
    x = x[torch.isfinite(x) & (x.abs() < 1e30)]
    if inside:
        x = x.clamp(*in_range_interval(*enc))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    want, want_grad = _aten(x, *enc, upstream)
    xr = x.clone().requires_grad_()
    batch_range = (float(x.min()), float(x.max()))
    y = fake_quantize_per_tensor(
        xr,
        torch.tensor(scale),
        torch.tensor(zero_point, dtype=torch.int32),
        qmin,
        qmax,
        batch_range,
    )
    y.backward(upstream)
    assert torch.equal(y, want) and torch.equal(xr.grad, want_grad)
    assert y.grad_fn.name().startswith("_FakeQuantizeInRange") == inside


@FAST
@given(enc=encodings(), seed=st.integers(0, 2**31 - 1), inside=st.booleans())
def test_the_output_can_be_modified_in_place_as_atens_can(enc, seed, inside):
    """torchvision's models run ``relu(inplace=True)`` on a quantized layer's output (DenseNet
    after its last norm): both autograd nodes allow it, with ATen's gradient."""
    scale, zero_point, qmin, qmax = enc
    x = _inputs(seed, 64, *enc)
    x = x[torch.isfinite(x) & (x.abs() < 1e30)]
    if inside:
        x = x.clamp(*in_range_interval(*enc))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    s, z = torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fake_quantize_per_tensor(a, s, z, qmin, qmax, (float(x.min()), float(x.max())))
    want = torch.fake_quantize_per_tensor_affine(b, s, z, qmin, qmax)
    torch.relu_(got)
    torch.relu_(want)
    got.backward(upstream)
    want.backward(upstream)
    assert torch.equal(got, want) and torch.equal(a.grad, b.grad)


@FAST
@given(
    enc=encodings(),
    seed=st.integers(0, 2**31 - 1),
    order=st.permutations([0, 1, 2, 3]),
    known=st.booleans(),
)
def test_a_permuted_view_gives_atens_values_gradient_and_strides(enc, seed, order, known):
    """Attention's heads come as ``q.transpose(1, 2)``: the path works in memory order and
    hands back a tensor with the input's strides, as ATen's kernel does."""
    scale, zero_point, qmin, qmax = enc
    flat = _inputs(seed, 96, *enc)
    flat = flat[torch.isfinite(flat) & (flat.abs() < 1e30)][:96]
    flat = torch.cat([flat, flat.new_zeros(96 - flat.numel())])
    x = flat.reshape(2, 3, 4, 4).permute(*order)
    s, z = torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    a = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    b = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    batch_range = (float(x.min()), float(x.max())) if known else None
    got = fake_quantize_per_tensor(a, s, z, qmin, qmax, batch_range)
    want = torch.fake_quantize_per_tensor_affine(b, s, z, qmin, qmax)
    assert got is not None  # the path was taken
    assert got.stride() == want.stride() == a.stride()
    torch.relu_(got)  # still allowed in place
    torch.relu_(want)
    got.backward(upstream)
    want.backward(upstream)
    assert torch.equal(got, want) and torch.equal(a.grad, b.grad)


@FAST
@given(enc=encodings())
def test_the_interval_is_exactly_the_in_range_inputs(enc):
    scale, zero_point, qmin, qmax = enc
    lo, hi = in_range_interval(scale, zero_point, qmin, qmax)
    x = torch.tensor([_next_f32(lo, False), lo, hi, _next_f32(hi, True)])
    _, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
        x, scale, zero_point, qmin, qmax
    )
    assert mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    "x, scale, why",
    [
        (torch.randn(64, 64, dtype=torch.float64), torch.tensor(0.1), "float64"),
        (torch.randn(64, 128)[:, ::2], torch.tensor(0.1), "not dense"),
        (torch.randn(64, 64), torch.tensor(0.1, requires_grad=True), "learnable scale"),
    ],
)
def test_where_the_path_does_not_apply_it_declines(x, scale, why):
    assert fake_quantize_per_tensor(x, scale, torch.tensor(0, dtype=torch.int32), 0, 255) is None
    # 16-bit codes have no 8-bit kernel either.
    x = torch.randn(64, 64)
    assert fake_quantize_per_tensor(x, scale.detach(), torch.tensor(0), -32768, 32767) is None


def test_a_quantizer_matches_torch_ao_on_the_path():
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    ours = Quantizer(QuantScheme(bits=8, symmetric=False, signed=False))
    x = torch.randn(16, 300) * 3 + 1
    with ours.compute_encodings():
        ours(x)
    oracle = FakeQuantize(
        MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8
    )
    oracle.disable_observer()
    scale, zero_point = ours.encoding()
    oracle.scale, oracle.zero_point = scale.reshape(1), zero_point.reshape(1)
    x = torch.randn(16, 300) * 4 + 1  # some clipped on both sides
    upstream = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(a), oracle(b)
    ya.backward(upstream)
    yb.backward(upstream)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert bool((a.grad == 0).any()) and bool((a.grad != 0).any())
    node = ya.grad_fn.next_functions[0][0]  # under fake_quantize's reshape
    assert node.name().startswith("_FakeQuantize")  # it ran on the vectorized path


@pytest.mark.parametrize("observer", ["minmax", "moving_minmax"])
def test_a_training_quantizer_takes_the_shortcut_only_when_nothing_clips(observer):
    torch.manual_seed(0)
    scheme = QuantScheme(bits=8, symmetric=False, signed=False, observer=observer)
    ours = Quantizer(scheme).train()
    with ours.compute_encodings():
        ours(torch.randn(16, 300))
    ours.enable_observer(True)  # QAT: the observers keep tracking
    for step in range(4):
        x = (torch.randn(16, 300) * (1 + step)).requires_grad_()  # each batch wider
        y = ours(x)
        # The minmax range always holds the batch just observed; the moving average lags.
        node = y.grad_fn.next_functions[0][0].name()
        assert node.startswith("_FakeQuantizeInRange") == (observer == "minmax")
        scale, zero_point = ours.encoding()
        want = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
        upstream = torch.randn_like(x)
        (want_grad,) = torch.autograd.grad(want, x, upstream)
        (grad,) = torch.autograd.grad(y, x, upstream)
        assert torch.equal(y, want) and torch.equal(grad, want_grad)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    axis=st.sampled_from([0, 1]),
    symmetric=st.booleans(),
    bits=st.sampled_from([4, 8]),
    shape=st.tuples(st.integers(1, 40), st.integers(1, 90)),
)
def test_per_channel_weights_equal_atens(seed, axis, symmetric, bits, shape):
    """A per-channel weight quantizer that keeps observing (QAT) takes the path when no
    channel clips; values and gradient are ATen's either way."""
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(
        bits=bits, granularity="per_channel", axis=axis, symmetric=symmetric, signed=symmetric
    )
    ours = Quantizer(scheme).train()
    w0 = torch.randn(shape, generator=g) * (1 + 10 * torch.rand((), generator=g))
    with ours.compute_encodings():
        ours(w0)
    ours.enable_observer(True)
    w = (w0 + 0.3 * torch.randn(shape, generator=g)).requires_grad_()
    y = ours(w)
    scale, zero_point = ours.encoding()
    want = torch.fake_quantize_per_channel_affine(
        w, scale, zero_point, axis, scheme.qmin, scheme.qmax
    )
    upstream = torch.randn(shape, generator=g)
    (want_grad,) = torch.autograd.grad(want, w, upstream)
    (grad,) = torch.autograd.grad(y, w, upstream)
    assert torch.equal(y, want) and torch.equal(grad, want_grad)
    clipped = bool((want_grad != upstream).any())
    node = y.grad_fn.next_functions[0][0].name()  # under fake_quantize's reshape
    assert node.startswith("_FakeQuantizeInRange") == (not clipped)


def test_a_quantize_kernel_that_disagrees_turns_the_path_off(monkeypatch):
    real = torch.quantize_per_tensor

    def off_by_one(x, scale, zero_point, dtype):
        return real(x + scale, scale, zero_point, dtype)

    monkeypatch.setattr(torch, "quantize_per_tensor", off_by_one)
    cpu_fake_quant.enabled.cache_clear()
    try:
        assert not cpu_fake_quant.enabled()
        x = torch.randn(64, 64)
        assert fake_quantize_per_tensor(x, torch.tensor(0.1), torch.tensor(3), 0, 255) is None
        # Quantizers then run ATen's kernel: still torch.ao's values.
        want = torch.fake_quantize_per_tensor_affine(x, 0.1, 3, 0, 255)
        from qat_lightning.quant.functional import fake_quantize

        got = fake_quantize(
            x,
            torch.tensor(0.1),
            torch.tensor(3, dtype=torch.int32),
            QuantScheme(bits=8, symmetric=False, signed=False),
        )
        assert torch.equal(got, want)
    finally:
        cpu_fake_quant.enabled.cache_clear()


@pytest.mark.parametrize(
    "context",
    [torch.inference_mode, torch.no_grad, lambda: _float64_default()],
    ids=["inference_mode", "no_grad", "float64 default"],
)
def test_the_probes_answer_does_not_depend_on_where_it_first_runs(context):
    """The first fake quant of a process may run in a validation loop (inference mode) or
    under no_grad; the probe must still find the kernels agree (it once said no there, and the
    path stayed off for the whole process)."""
    cpu_fake_quant.enabled.cache_clear()
    try:
        with context():
            assert cpu_fake_quant.enabled()
    finally:
        cpu_fake_quant.enabled.cache_clear()
    assert torch.get_default_dtype() == torch.float32


@contextlib.contextmanager
def _float64_default():
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_environment_turns_the_path_off(monkeypatch):
    monkeypatch.setenv("QAT_LIGHTNING_CPU_FAKE_QUANT", "0")
    cpu_fake_quant.enabled.cache_clear()
    try:
        assert not cpu_fake_quant.enabled()
    finally:
        monkeypatch.delenv("QAT_LIGHTNING_CPU_FAKE_QUANT")
        cpu_fake_quant.enabled.cache_clear()
    assert cpu_fake_quant.enabled()
