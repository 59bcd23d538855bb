"""What eval-mode integer simulation derives from a module's weights and encodings, kept
until one of them changes.

Every eval forward of a MAC layer would otherwise fold the BatchNorm into the weight again,
quantize it, center the codes, bound its float32-exact input ranges and round the bias to int32.
`EvalCache` keeps that result with a key made of every parameter and buffer the module owns
(each tensor itself, its in-place version counter and its data pointer) and whatever else the
caller adds (the input encoding's values, the schemes): an optimizer step, ``load_state_dict``,
a changed encoding, a BN statistic, ``fold_bn`` or ``.to(device)`` all change the key, so a
stale value is never used. It is not state: no buffer, not in ``state_dict``, and ``deepcopy``
and pickling give an empty cache (the copy computes its own).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn

from qat_lightning.quant import QTensor, Quantizer
from qat_lightning.quant.functional import code_dtype

_SLOT = "_eval_cache"


class EvalCache:
    """One cached value and the key it was computed for."""

    __slots__ = ("_key", "_value")

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: Any = None

    def get(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """The value for ``key``: the kept one if ``key`` matches the last, else ``compute()``.

        ``key`` entries are compared by identity where they are tensors, by ``==`` otherwise.
        """
        if self._key is None or not _same_key(self._key, key):
            self._key, self._value = None, None  # a failing compute() leaves nothing behind
            value = compute()
            self._key, self._value = key, value
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None

    def __deepcopy__(self, memo: dict) -> EvalCache:
        return EvalCache()

    def __reduce__(self) -> tuple[type, tuple]:
        return EvalCache, ()


def _same_key(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


def eval_cache(module: nn.Module) -> EvalCache:
    """``module``'s cache (made on first use; a plain attribute, not a buffer)."""
    cache = module.__dict__.get(_SLOT)
    if cache is None:
        cache = module.__dict__[_SLOT] = EvalCache()
    return cache


def clear_eval_cache(module: nn.Module) -> None:
    """Drop ``module``'s cached value (it is recomputed on the next integer forward)."""
    cache = module.__dict__.get(_SLOT)
    if cache is not None:
        cache.clear()


def tensors_key(tensors: Iterable[torch.Tensor | None]) -> tuple[Hashable | torch.Tensor, ...]:
    """Each tensor, its version counter (bumped by every in-place write), its data pointer
    (changed by ``.data = ...`` and moves) and its shape."""
    key: list[Any] = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference():  # no version counter: a key that never matches (no caching)
            key.append(object())
        else:
            key += (t, t._version, t.data_ptr(), t.shape)
    return tuple(key)


def module_state_key(module: nn.Module, extra: Iterable[torch.Tensor | None] = ()) -> tuple:
    """`tensors_key` of every parameter and buffer of ``module`` (its submodules' too) and of
    ``extra`` (tensors it reads but does not own, e.g. a producer's encoding)."""
    state = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    return tensors_key([*state, *extra])


# -- the codes behind a dequantized output --------------------------------------------------
# Between two quantized layers the integer simulation hands over floats: the producer
# dequantizes its output codes and the consumer quantizes that float again to the same
# encoding, which gives back exactly the same codes (``|k * s * (1/s) - k| < 0.5`` in float32
# for every code ``k`` of at most 16 bits). The producer's float output therefore carries its
# `QTensor`, and a consumer quantizing it to the same encoding takes the codes instead of
# recomputing them, unless the tensor was written in place since.

_LINK = "_qat_codes"


def dequantize_linked(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """``q.dequantize().to(dtype)`` (the same values, one new tensor), carrying ``q`` for
    `quantize_linked`."""
    if q.scheme is None or q.scheme.bits > 16 or q.scheme.granularity != "per_tensor":
        return q.dequantize().to(dtype)
    scale = q.scale
    centered = centered_float32(q)
    if centered is None:
        _, zp = q.broadcast_encoding()
        centered = q.codes.float().sub_(zp.float())
        attach_centered(q, centered)  # for the MAC that consumes it
    out = (centered * scale.float()).to(dtype)
    # an inference tensor (``torch.inference_mode``) has no version counter: a write in place
    # could not be seen, so it carries nothing
    linkable = scale.dim() == 0 and not q.scheme.dynamic and not out.is_inference()
    if linkable and 1e-30 < float(scale) < 1e30:
        out.__dict__[_LINK] = (q, out._version, q.codes._version)
    return out


def quantize_linked(quantizer: Quantizer, x: torch.Tensor) -> QTensor:
    """``quantizer.quantize(x)``, bit for bit: the codes ``x`` carries from
    `dequantize_linked` where they are under the same encoding and ``x`` is unchanged."""
    link = x.__dict__.get(_LINK) if isinstance(x, torch.Tensor) else None
    if link is not None:
        q, version, codes_version = link
        scheme = quantizer.scheme
        unchanged = version == x._version and codes_version == q.codes._version
        if unchanged and q.scheme == scheme and not scheme.dynamic:
            scale, zero_point = quantizer.encoding()
            if (
                scale.dim() == 0
                and torch.equal(scale, q.scale)
                and torch.equal(zero_point, q.zero_point)
            ):
                return q
    return quantize_owned(quantizer, x, owned=False)


def quantize_owned(quantizer: Quantizer, x: torch.Tensor, owned: bool = True) -> QTensor:
    """``quantizer.quantize(x)``, bit for bit, for a float32 ``x`` the caller gives up
    (``owned``): a static per-tensor encoding quantizes it in place (no new full-size tensor
    but the codes); not ``owned``, one new float32 tensor is made and worked on in place.
    """
    scheme = quantizer.scheme
    if x.dtype != torch.float32 or scheme.dynamic or scheme.granularity != "per_tensor":
        return quantizer.quantize(x)
    scale, zero_point = quantizer.encoding()
    if scale.dim() > 0:
        return quantizer.quantize(x)
    codes = x.mul_(1.0 / scale) if owned else x * (1.0 / scale)
    codes = codes.round_().add_(zero_point).clamp_(scheme.qmin, scheme.qmax)
    return QTensor(codes.to(code_dtype(scheme)), scale, zero_point, scheme)


# A `QTensor` of at most 16 bits may carry ``codes - zero_point`` as float32 (exact), made
# where it was cheap (the requantization computes it on the way): the MAC that consumes it and
# the dequantization that follows take it instead of converting the codes again.
_CENTERED = "_centered_float32"


def attach_centered(q: QTensor, centered: torch.Tensor) -> QTensor:
    """Record ``centered`` (float32, ``q.codes - q.zero_point`` exactly) on ``q``."""
    q.__dict__[_CENTERED] = (centered, _version(centered), q.codes, _version(q.codes))
    return q


def _version(t: torch.Tensor) -> int | None:
    """The version counter; None for an inference tensor, which has none (the two tensors
    recorded by `attach_centered` are made by the integer simulation and read right after)."""
    return None if t.is_inference() else t._version


def centered_float32(q: QTensor) -> torch.Tensor | None:
    """The float32 ``codes - zero_point`` recorded on ``q``, or None (none, or either tensor
    was written in place or replaced since)."""
    entry = q.__dict__.get(_CENTERED)
    if entry is None:
        return None
    centered, version, codes, codes_version = entry
    if _version(centered) != version or codes is not q.codes or _version(codes) != codes_version:
        return None
    return centered
