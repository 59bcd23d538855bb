"""Fake quantization on the CPU with vectorized kernels, bit-identical to ATen's.

ATen's CPU fake-quant kernel (`torch.fake_quantize_per_tensor_affine`, and the cachemask
variant torch.ao's `FakeQuantize` calls) runs a scalar loop: about 3 ns an element on one
core, six times a GELU over the same tensor, and its backward converts the boolean mask to
float before multiplying. In a QAT step that quantizes every activation these passes are a
large part of the step. This path computes the same values with vectorized kernels:

1. the inputs whose code is in range form one interval ``[lo, hi]`` of floats, since
   ``round(x * (1/scale))`` is monotonic in ``x``; `in_range_interval` finds its two ends
   exactly from the scale and zero point (float32 arithmetic, ties to even, as the kernel);
2. ``clamped = clamp(nan_to_num(x), lo, hi)``, the mask is ``clamped == x``;
3. codes are ``quantize_per_tensor(clamped)`` (fbgemm's vectorized rounding: in range by
   construction, so it rounds exactly as ATen's kernel) and the output their dequantization;
4. the backward is ``where(mask, grad, 0)``.

Where the caller knows the tensor's min and max (the observer read them in the same host
sync that checks them finite), a tensor entirely inside ``[lo, hi]`` skips steps 2 and 4:
its codes are its quantization and its gradient passes unchanged. Per channel (weights) only
that case is taken: every channel's min and max in range (ATen's kernel checks the two ends),
then ``quantize_per_channel`` and ``dequantize``.

Non-finite inputs go where ATen's kernel puts them (NaN and -inf to the lowest code, +inf to
the highest, mask off), and so do inputs far outside the range; the probe checks both. The
gradient of a clipped element is +0 where ATen's multiply by its mask gives -0 (a negative
upstream gradient) or NaN (a non-finite one): equal values otherwise.

The path covers float32 CPU tensors, contiguous or permuted views of dense memory (worked on
in memory order), with codes in ``[0, 255]`` (any zero point in it) or ``[-128, 127]``, a
non-learnable scheme, outside ``torch.compile``; everything else takes ATen's kernel.
`enabled` checks once, on a probe of ties, edges, NaN and infinities, that this build's
quantize kernel agrees with ATen's fake quant, and otherwise never takes the path.
``QAT_LIGHTNING_CPU_FAKE_QUANT=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from qat_lightning.quant.host_float32 import f32, in_range_interval, next_f32

# Below this many elements ATen's kernel is as fast (forward + backward, one core: about even
# at 4096; ATen's 1.5x slower at 16384): the interval and the extra ops' dispatch cost more.
MIN_NUMEL = 4096


def _code_dtype(qmin: int, qmax: int) -> torch.dtype | None:
    if qmin >= 0 and qmax <= 255:
        return torch.quint8
    if qmin >= -128 and qmax <= 127:
        return torch.qint8
    return None


def _clip_and_quantize(
    x: torch.Tensor, scale: float, zero_point: int, lo: float, hi: float, dtype, finite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and mask of the clipping case (run without autograd)."""
    if finite:  # the caller saw the batch's min and max: no NaN or infinity to map
        clamped = torch.clamp(x, lo, hi)
    else:
        clamped = torch.nan_to_num(x, nan=lo, posinf=hi, neginf=lo).clamp_(lo, hi)
    values = torch.quantize_per_tensor(clamped, scale, zero_point, dtype).dequantize()
    return values, torch.eq(clamped, x)


class _FakeQuantizeMasked(torch.autograd.Function):
    """The values of ``compute()`` (run in ``forward``, without autograd); the gradient
    ``where(mask, grad, 0)``."""

    @staticmethod
    def forward(ctx, x, compute):
        values, mask = compute()
        ctx.save_for_backward(mask)
        return values

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None


class _FakeQuantizeInRange(torch.autograd.Function):
    """The values of ``compute()``, every element in range: nothing clipped, the gradient
    passes unchanged (ATen's mask is all ones)."""

    @staticmethod
    def forward(ctx, x, compute):
        values, _ = compute()
        return values

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _with_gradient(x: torch.Tensor, compute, masked: bool) -> torch.Tensor:
    """The values ``compute()`` returns (with its mask, or None) as the output of ``x``:
    masked, passed through, or as they are where no gradient is asked for.

    The values are computed inside the autograd node's ``forward``, never handed to it: a
    custom Function's output that is one of its inputs becomes a view, and an in-place op
    on it (torchvision's ``relu(inplace=True)`` after a quantized norm) is then an error.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        with torch.no_grad():
            return compute()[0]
    node = _FakeQuantizeMasked if masked else _FakeQuantizeInRange
    return node.apply(x, compute)


def fake_quantize_per_tensor(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    batch_range: tuple[float, float] | None = None,
    encoding: tuple[float, int] | None = None,
) -> torch.Tensor | None:
    """``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)`` (values
    and gradient) on the vectorized path, or None where the path does not apply (the caller
    then runs ATen's kernel). ``batch_range``: the finite min and max of ``x``, where the
    caller has them (an observer just read them); with it, a tensor inside the in-range
    interval skips the clipping and the mask. ``encoding``: ``(float(scale),
    int(zero_point))`` where the caller has them (two host reads fewer)."""
    if scale.requires_grad:
        return None
    order = _memory_order(x)
    if order is not None:  # a transposed view (attention's heads): work in memory order
        return _in_memory_order(
            order,
            lambda xm: fake_quantize_per_tensor(
                xm, scale, zero_point, qmin, qmax, batch_range, encoding
            ),
            x,
        )
    setup = _per_tensor(x, scale, zero_point, qmin, qmax, encoding)
    if setup is None:
        return None
    s, z, lo, hi, dtype = setup
    if batch_range is not None and lo <= batch_range[0] and batch_range[1] <= hi:
        return _with_gradient(
            x, lambda: (torch.quantize_per_tensor(x, s, z, dtype).dequantize(), None), masked=False
        )
    finite = batch_range is not None
    return _with_gradient(
        x, lambda: _clip_and_quantize(x, s, z, lo, hi, dtype, finite), masked=True
    )


def fake_quantize_after_relu(
    y: torch.Tensor,
    relu_y: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    batch_range: tuple[float, float] | None,
    encoding: tuple[float, int] | None = None,
) -> torch.Tensor | None:
    """``torch.fake_quantize_per_tensor_affine(torch.relu(y), ...)``, values and gradient,
    as one autograd node that keeps one boolean mask for both (ReLU alone keeps its float
    output for its backward: four bytes an element where this keeps one). ``relu_y`` is
    ``relu(y)`` computed without autograd, ``batch_range`` its finite min and max (the
    observer's), ``encoding`` the scale and zero point as Python values where the caller has
    them; None where the path does not apply (the caller runs ReLU, then the plain fake
    quant).

    The zero point lies in ``[qmin, qmax]``, so 0 is in range (``lo <= 0 <= hi``): the codes
    are those of ``min(relu(y), hi)``, and both gradients pass exactly where ``0 < y <= hi``.
    (No subnormal constant stands in for 0 here: arithmetic on subnormals is some twenty
    times slower on x86.)
    """
    order = _memory_order(y)
    if order is not None:  # a channels-last conv output: work in memory order
        return _in_memory_order(
            order,
            lambda ym, rm: fake_quantize_after_relu(
                ym, rm, scale, zero_point, qmin, qmax, batch_range, encoding
            ),
            y,
            relu_y,
        )
    setup = None if batch_range is None else _per_tensor(y, scale, zero_point, qmin, qmax, encoding)
    if setup is None:
        return None
    s, z, _, hi, dtype = setup

    def compute():
        if batch_range[1] <= hi:  # nothing clipped above: only ReLU's mask
            values = torch.quantize_per_tensor(relu_y, s, z, dtype).dequantize()
            return values, torch.gt(y, 0)
        clipped = torch.clamp(relu_y, max=hi)
        values = torch.quantize_per_tensor(clipped, s, z, dtype).dequantize()
        return values, torch.gt(y, 0).logical_and_(torch.le(y, hi))

    return _with_gradient(y, compute, masked=True)


def _per_tensor(x, scale, zero_point, qmin: int, qmax: int, encoding=None) -> tuple | None:
    """``(scale, zero_point, lo, hi, code dtype)`` as Python values where the per-tensor
    path applies to ``x`` and this encoding (``encoding``: scale and zero point already read,
    or None), else None."""
    dtype = _code_dtype(qmin, qmax)
    if dtype is None or not _applies(x) or not enabled():
        return None
    s, z = encoding if encoding is not None else (float(scale), int(zero_point))
    interval = in_range_interval(s, z, qmin, qmax)
    if interval is None or not qmin <= z <= qmax:
        return None
    return s, z, *interval, dtype


def _memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation of ``x``'s dimensions under which it is contiguous, where ``x`` is not
    but is a permuted view of dense memory (``q.transpose(1, 2)``); else None.

    The path works on that contiguous view and permutes its result back, so the output
    has ``x``'s strides, as ATen's kernel's has (``empty_like`` keeps them), and the
    permutations are ordinary autograd views outside the path's own node (an in-place op on
    the output stays allowed)."""
    if x.is_contiguous() or x.dim() < 2:
        return None
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return order if x.permute(order).is_contiguous() else None


def _in_memory_order(order: tuple[int, ...], path, *tensors: torch.Tensor):
    """``path`` on ``tensors`` permuted by ``order`` (`_memory_order` of the first), its
    result permuted back; None where a tensor is not contiguous in that order or ``path``
    declines."""
    permuted = [t.permute(order) for t in tensors]
    if not all(t.is_contiguous() for t in permuted):
        return None
    out = path(*permuted)
    if out is None:
        return None
    inverse = [0] * len(order)
    for at, dim in enumerate(order):
        inverse[dim] = at
    return out.permute(inverse)


def _applies(x: torch.Tensor) -> bool:
    """The tensor conditions of the vectorized path (the code range is checked apart)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() >= MIN_NUMEL
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
    )


def fake_quantize_per_channel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    qmin: int,
    qmax: int,
    batch_range: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor | None:
    """``torch.fake_quantize_per_channel_affine`` where no element is clipped: the codes of
    each channel's min and max (``batch_range``, from the observer that just saw ``x``) are
    checked in range with ATen's own kernel (the in-range inputs of a channel are an
    interval, so its two ends decide), then ``quantize_per_channel`` and ``dequantize`` give
    the values and the gradient passes unchanged. None where anything is clipped or the path
    does not apply (the caller runs ATen's kernel)."""
    if scale.requires_grad or not _applies(x):
        return None
    dtype = _code_dtype(qmin, qmax)
    if dtype is None or not enabled():
        return None
    ends = torch.stack(batch_range, dim=1).float()
    _, inside = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        ends, scale, zero_point, 0, qmin, qmax
    )
    if not bool(inside.all()):
        return None
    zero_point = zero_point.long()
    return _with_gradient(
        x,
        lambda: (torch.quantize_per_channel(x, scale, zero_point, axis, dtype).dequantize(), None),
        masked=False,
    )


@functools.cache
def enabled() -> bool:
    """Whether the vectorized path is on: not turned off by the environment, and this build's
    quantize kernel agrees with ATen's fake quant on a probe (checked once per process)."""
    if os.environ.get("QAT_LIGHTNING_CPU_FAKE_QUANT", "1") == "0":
        return False
    # The first call may come from anywhere (a validation loop in inference mode, no_grad, a
    # float64 default dtype): the probe sets its own context, so its answer never depends on it.
    with (
        warnings.catch_warnings(),
        torch.inference_mode(False),
        torch.enable_grad(),
        _default_dtype(torch.float32),
    ):
        # torch warns once that quantized tensors are deprecated; this path never returns one.
        warnings.simplefilter("ignore")
        try:
            return _probe_agrees()
        except (RuntimeError, ValueError):
            return False


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def _probe_agrees() -> bool:
    g = torch.Generator().manual_seed(0)
    for scale, zero_point, qmin, qmax in (
        (0.05, 100, 0, 255),
        (0.013, 0, -128, 127),
        (0.3, 3, 0, 15),
        (1e-3, 255, 0, 255),
    ):
        interval = in_range_interval(f32(scale), zero_point, qmin, qmax)
        if interval is None:
            return False
        k = torch.randint(qmin - zero_point - 3, qmax - zero_point + 4, (999,), generator=g)
        x = torch.cat(
            [
                torch.randn(1000, generator=g) * scale * (qmax - qmin) / 3,
                (k.float() + 0.5) * f32(scale),  # ties
                torch.tensor([*interval, float("nan"), float("inf"), float("-inf")]),
                torch.tensor([1e9, -1e9, 3e30, -3e30]) * scale,  # far outside the range
            ]
        )
        for edge in interval:
            x = torch.cat([x, torch.tensor([next_f32(edge, True), next_f32(edge, False)])])
        x.requires_grad_()
        s = torch.tensor(f32(scale))
        z = torch.tensor(zero_point, dtype=torch.int32)
        want = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
        code = _code_dtype(qmin, qmax)
        compute = functools.partial(
            _clip_and_quantize, x, float(s), zero_point, *interval, code, False
        )
        y = _with_gradient(x, compute, masked=True)
        upstream = torch.randn(x.shape, generator=g)
        (want_grad,) = torch.autograd.grad(want, x, upstream)
        (grad,) = torch.autograd.grad(y, x, upstream)
        if not (torch.equal(y, want) and torch.equal(grad, want_grad)):
            return False
    # Per channel the path quantizes in-range tensors only: ties and near-ties inside.
    for axis, zero_point, qmin, qmax in ((0, 0, -128, 127), (1, 77, 0, 255)):
        scale = torch.rand(5, generator=g) * 0.1 + 1e-3
        shape = (5, 300) if axis == 0 else (300, 5)
        view = (-1, 1) if axis == 0 else (1, -1)
        k = torch.randint(qmin - zero_point, qmax - zero_point, shape, generator=g)
        x = (k.float() + torch.tensor([0.5, 0.25, 0.0])[k % 3]) * scale.reshape(view)
        z = torch.full((5,), zero_point, dtype=torch.int32)
        want = torch.fake_quantize_per_channel_affine(x, scale, z, axis, qmin, qmax)
        y = torch.quantize_per_channel(x, scale, z.long(), axis, _code_dtype(qmin, qmax))
        if not torch.equal(y.dequantize(), want):
            return False
    return True
