"""Fake quantization of an embedding table's looked-up rows only.

A batch of BERT reads about 512 of its 30522 word rows, yet fake-quantizing the table
quantizes all of them every step (and masks the whole gradient). Where every row's encoding
is its own (per row, axis 0; per group along the row) or shared (per tensor), and fixed within
the step (not learnable), quantizing the gathered rows with their gathered scales gives the
very values ``embedding(indices, fake_quant(table))`` gives, and `_LookedUpRows`' backward
gives its very gradient (the lookup's gradient, then the clip mask on the rows looked up).

The weight quantizer's observer still sees the whole table (a per-row min/max is one cheap
reduction), so encodings are those of the full path. Learnable (LSQ) scales sum their
gradient over the table in another order, and a quantizer with hooks (health probes,
sensitivity counts) or its own forward (a converted model's frozen one) expects to be called
on the table: these take the full path.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.nn.split_fake_quant import must_be_called, observe
from qat_lightning.quant import Quantizer, QuantScheme


def rows_suffice(quantizer: Quantizer) -> bool:
    """True where fake-quantizing the looked-up rows equals fake-quantizing the table."""
    scheme = quantizer.scheme
    if scheme.learnable or scheme.dynamic:
        return False
    if scheme.per_channel and scheme.axis not in (0, -2):
        return False
    if scheme.granularity not in ("per_tensor", "per_channel", "per_group"):
        return False
    return not must_be_called(quantizer)


def _fake_quant_with_mask(
    rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels `quant.functional.fake_quantize` calls for a non-learnable scheme,
    with their clip mask: rows ``(n, dim)``, their scales ``()``, ``(n,)`` or ``(n, groups)``."""
    qmin, qmax = scheme.qmin, scheme.qmax
    scale = scale.float()
    if zero_point.dtype != torch.int32:
        zero_point = zero_point.round().to(torch.int32)
    if scheme.multi_scale and scale.dim() > 0:
        view = rows.reshape(-1, scheme.group_size) if scheme.per_group else rows
        y, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            view, scale.reshape(-1), zero_point.reshape(-1), 0, qmin, qmax
        )
        return y.reshape(rows.shape), mask.reshape(rows.shape)
    enabled = torch.ones(1, dtype=torch.long, device=rows.device)
    return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        rows, scale, zero_point, enabled, qmin, qmax
    )


class _LookedUpRows(torch.autograd.Function):
    """``embedding(indices, fake_quant(table))`` computed on the looked-up rows."""

    @staticmethod
    def forward(ctx, table, indices, scale, zero_point, scheme, padding_idx, by_freq):
        flat = indices.reshape(-1)
        rows = table.index_select(0, flat)
        if scale.dim() > 0:
            scale, zero_point = scale.index_select(0, flat), zero_point.index_select(0, flat)
        y, mask = _fake_quant_with_mask(rows, scale, zero_point, scheme)
        ctx.save_for_backward(indices, mask)
        ctx.lookup = (table.shape[0], padding_idx, by_freq)
        return y.reshape(*indices.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad):
        indices, mask = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        num, padding_idx, by_freq = ctx.lookup
        # The full path's order: the lookup's gradient first, then the clip mask. Rows not
        # looked up have a zero gradient, which the mask keeps zero.
        grad_table = torch.ops.aten.embedding_dense_backward(
            grad, indices, num, padding_idx, by_freq
        )
        flat = indices.reshape(-1)
        grad_table.index_put_((flat,), grad_table.index_select(0, flat) * mask)
        return grad_table, None, None, None, None, None, None


def looked_up_rows(
    quantizer: Quantizer,
    table: torch.Tensor,
    indices: torch.Tensor,
    padding_idx: int | None,
    scale_grad_by_freq: bool,
) -> torch.Tensor:
    """``F.embedding(indices, quantizer(table), padding_idx, ...)``, fake-quantizing only the
    rows looked up; for a ``quantizer`` where `rows_suffice` holds.

    Args:
        quantizer: the table's weight quantizer (observes the whole table, as when called).
        table: the ``(num_embeddings, embedding_dim)`` float table.
        indices: integer indices of any shape.
        padding_idx: the row that gets no gradient (None: none).
        scale_grad_by_freq: scale each row's gradient by its inverse frequency in the batch.

    Returns:
        The fake-quantized rows, shape ``(*indices.shape, embedding_dim)``.
    """
    if not observe(quantizer, table):
        return nn.functional.embedding(
            indices, table, padding_idx, None, 2.0, scale_grad_by_freq, False
        )
    padding = -1 if padding_idx is None else padding_idx
    return _LookedUpRows.apply(
        table, indices, quantizer.scale, quantizer.zero_point, quantizer.scheme, padding,
        scale_grad_by_freq,
    )  # fmt: skip
