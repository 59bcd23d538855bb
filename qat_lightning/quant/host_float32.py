"""Exact float32 arithmetic on the host, for the CPU fast paths.

The fast paths of a training step work on Python floats where a tensor op would cost more
than its arithmetic: the interval of inputs a fake quant keeps in range
(`in_range_interval`), and a per-tensor observer's merge and encoding
(`encoding_from_host_range`, `Observer._host_merge`). Each result must be bit for bit what
the tensor ops give, so every step is one IEEE float32 operation: a float64 operation of
float32 operands rounded once to float32 (exact for ``+ - * /``: 53 >= 2 * 24 + 2), or a
numpy float32 scalar operation.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from qat_lightning.quant.scheme import QuantScheme

# The smallest scale an encoding may have (`functional.EPS` is this one); this module imports
# nothing of the package at run time.
EPS = torch.finfo(torch.float32).eps

_F32 = struct.Struct("<f")
_I32 = struct.Struct("<i")
_TINY = _F32.unpack(_I32.pack(1))[0]  # the smallest positive float32 (a subnormal)


def f32(v: float) -> float:
    """``v`` rounded to float32 (once: the products rounded here are exact in float64)."""
    return _F32.unpack(_F32.pack(v))[0]


def next_f32(v: float, up: bool) -> float:
    """The float32 next to ``v`` (a float32 value, finite) towards +inf or -inf."""
    if v == 0.0:  # the smallest subnormal, of the sign of the direction
        return _TINY if up else -_TINY
    bits = _I32.unpack(_F32.pack(v))[0]
    bits += 1 if (v > 0) == up else -1
    return _F32.unpack(_I32.pack(bits))[0]


@functools.lru_cache(maxsize=4096)
def in_range_interval(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple | None:
    """The float32 interval ``[lo, hi]`` of inputs whose code ``round(x * (1/scale)) +
    zero_point`` (float32 product, ties to even) lies in ``[qmin, qmax]``; None if it cannot
    be found here (a scale so large or small that the interval's ends leave float32)."""
    inv = f32(1.0 / scale)  # float64 division rounded once more: exact (53 >= 2 * 24 + 2)
    if not (0.0 < inv < 3.0e38):
        return None

    def code(x: float) -> float:
        return round(f32(x * inv))

    low, high = qmin - zero_point, qmax - zero_point
    try:
        lo = f32((low - 0.5) * scale)
        hi = f32((high + 0.5) * scale)
    except OverflowError:
        return None
    for _ in range(64):  # a few ulps at most; the bound only guards the loop
        if code(lo) < low:
            lo = next_f32(lo, up=True)
        elif code(next_f32(lo, up=False)) >= low:
            lo = next_f32(lo, up=False)
        else:
            break
    else:
        return None
    for _ in range(64):
        if code(hi) > high:
            hi = next_f32(hi, up=False)
        elif code(next_f32(hi, up=True)) <= high:
            hi = next_f32(hi, up=True)
        else:
            break
    else:
        return None
    return lo, hi


def encoding_from_host_range(min_val: float, max_val: float, scheme: QuantScheme) -> tuple:
    """`encodings_from_range` of one per-tensor range held as Python floats (float32 values):
    the same float32 operations, on the host, as ``(scale, zero_point)`` floats and int.

    Each operation is one IEEE float32 operation in numpy as in torch's kernels, so the
    result is bit for bit `encodings_from_range`'s (hypothesis checks it against that). For
    finite ranges with magnitudes below 1e38 and integer schemes (the caller checks).
    """
    single = np.float32  # numpy float32 scalars: every operation rounds to float32
    lo, hi = min(single(min_val), single(0.0)), max(single(max_val), single(0.0))
    eps = single(EPS)
    if scheme.symmetric:
        amax = hi if not scheme.signed else max(-lo, hi)
        return float(max(amax / single(scheme.qmax), eps)), 0
    scale = max((hi - lo) / single(scheme.qmax - scheme.qmin), eps)
    zero_point = single(scheme.qmin) - np.rint(lo / scale)
    qmin, qmax = single(scheme.qmin), single(scheme.qmax)
    return float(scale), int(min(max(zero_point, qmin), qmax))


def moving_average(old: float, new: float, c: float) -> float:
    """``old + c * (new - old)`` as float32 tensors compute it with a Python scalar ``c``:
    each operation rounded to float32, ``c`` taken as a float32."""
    single = np.float32
    return float(single(old) + single(c) * (single(new) - single(old)))
