"""Per-group and per-token encodings: their shapes, and the ranges of dynamic schemes.

A ``per_group`` encoding splits the *last* axis of a tensor into groups of ``group_size``
consecutive elements, one scale (and zero point) per group: for a Linear weight ``(out, in)``
the groups run along the input dimension, for an Embedding table ``(num, dim)`` along the
embedding dimension. The scale has shape ``(*shape[:-1], shape[-1] // group_size)``, and the
fused per-channel kernels run on the weight reshaped to ``(numel // group_size, group_size)``.

A ``per_token`` encoding has one scale per row over the last axis (shape ``shape[:-1]``); it
exists only for dynamic schemes, whose encoding is computed from each tensor at run time.
"""

from __future__ import annotations

import torch

from qat_lightning.quant.functional import encodings_from_range
from qat_lightning.quant.scheme import QuantScheme


class GroupSizeError(ValueError):
    """A ``per_group`` scheme meets a tensor whose last dimension its group size does not
    divide (or a tensor it does not apply to)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def group_shape(shape: tuple[int, ...] | torch.Size, group_size: int, what: str = "tensor"):
    """The encoding shape ``(*shape[:-1], shape[-1] // group_size)`` of a per-group scheme.

    Raises:
        GroupSizeError: ``shape`` has no axis, or ``group_size`` does not divide its last
            dimension (the message names ``what``, the dimension and the group size).
    """
    shape = tuple(shape)
    if not shape:
        raise GroupSizeError(
            f"{what}: per_group (group_size={group_size}) needs a tensor with at least one "
            "axis, got a 0-d tensor"
        )
    dim = shape[-1]
    if dim % group_size:
        shown = ", ".join(str(d) for d in _divisors(dim)[-6:])
        raise GroupSizeError(
            f"{what}: its last dimension ({dim}, shape {shape}) is not a multiple of "
            f"group_size={group_size}; allowed a group_size that divides {dim} (e.g. {shown})"
        )
    return (*shape[:-1], dim // group_size)


def encoding_shape(scheme: QuantScheme, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The shape of the scale ``scheme`` gives a tensor of ``shape``."""
    if scheme.per_group:
        return group_shape(shape, scheme.group_size)
    if scheme.granularity == "per_token":
        return tuple(shape)[:-1]
    if scheme.per_channel:
        return (tuple(shape)[scheme.axis],)
    return ()


@torch.no_grad()
def dynamic_encoding(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) of a dynamic scheme, from ``x`` itself: its
    min and max (per tensor: 0-d; per token: one per row over the last axis, shape
    ``x.shape[:-1]``). Non-finite values are left out of the range; an empty tensor (or a
    row with nothing finite) gets the range ``[0, 0]``."""
    xf = x.detach().float()
    xf = torch.where(torch.isfinite(xf), xf, 0.0)
    if scheme.granularity == "per_token":
        if xf.dim() == 0:
            raise ValueError(f"a per_token scheme needs a tensor with a last axis, got {x.shape}")
        if xf.shape[-1] == 0:
            zeros = xf.new_zeros(xf.shape[:-1])
            return encodings_from_range(zeros, zeros, scheme)
        return encodings_from_range(xf.amin(dim=-1), xf.amax(dim=-1), scheme)
    if xf.numel() == 0:
        zero = xf.new_zeros(())
        return encodings_from_range(zero, zero, scheme)
    mn, mx = torch.aminmax(xf)
    return encodings_from_range(mn, mx, scheme)
