"""Quantized ``F.scaled_dot_product_attention``, and the attention core every quantized
attention computes with.

`attention_core` is the one quantized attention there is: ``qk`` (a `QuantMatMul`) multiplies
the queries by the transposed keys, the scale, the additive masks and the softmax run in float
on its dequantized output, ``pv`` (a `QuantMatMul` whose input 0, the probabilities, is
quantized **unsigned**) multiplies them by the values. `QuantMultiheadAttention` and
`QuantScaledDotProductAttention` both call it, so integer eval, `convert` (each matmul becomes a
`QuantizedOp`) and ONNX (``QLinearMatMul`` in onnxruntime) follow from `QuantMatMul` alone.

`ScaledDotProductAttention` is ``F.scaled_dot_product_attention`` as a module: surgery rewrites
a traced call of the function into its quantized twin (as ``a + b`` becomes `QuantAdd`), and a
model may use the module directly. The quantized module's inputs q, k and v are quantized by
``qk.input_quantizers[0]``, ``qk.input_quantizers[1]`` and ``pv.input_quantizers[1]``.

With every quantizer of the module switched off (no fake quant, no observer) it *is* the float
function: it calls ``F.scaled_dot_product_attention`` with the same arguments, so a rewritten
block checked against its own forward (`surgery.rewrite_check`) compares equal bit for bit.
Otherwise the mask, ``is_causal``, ``scale``, ``dropout_p`` and ``enable_gqa`` are applied in
float around the two integer matmuls as the function defines them (a boolean mask: True
attends; a row with nothing to attend to gives zeros, as torch's kernels do).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.elementwise import QuantMatMul
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import Quantizer, QuantScheme


def softmax_quantizer(inputs: QuantScheme) -> Quantizer:
    """The quantizer of softmax probabilities, in [0, 1]: the activation scheme, unsigned."""
    return Quantizer(inputs.replace(signed=False, symmetric=False, narrow_range=False))


def attention_matmuls(inputs: QuantScheme | None) -> tuple[QuantMatMul, QuantMatMul]:
    """The ``qk`` and ``pv`` matmuls of a quantized attention (``pv``'s input 0 unsigned)."""
    qk, pv = QuantMatMul.create(inputs), QuantMatMul.create(inputs)
    if inputs is not None:
        pv.input_quantizers[0] = softmax_quantizer(inputs)
    return qk, pv


def attention_core(
    qk: nn.Module,
    pv: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    masks: tuple[torch.Tensor | None, ...] = (),
    dropout_p: float = 0.0,
    training: bool = False,
    safe_softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(qk(q, kᵀ) * scale + masks) -> dropout -> pv(., v)``; returns the output and
    the probabilities.

    ``masks`` are additive float masks (None: absent), added in order. ``safe_softmax``: rows
    every mask sets to ``-inf`` give zero probabilities (torch's SDPA kernels), not NaN.
    """
    scores = qk(q, k.transpose(-2, -1)) * scale
    present = [m for m in masks if m is not None]
    for mask in present:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    if safe_softmax and present:
        blocked = torch.zeros((), dtype=torch.bool, device=scores.device)
        for mask in present:
            blocked = blocked | (mask == -math.inf).all(dim=-1, keepdim=True)
        probs = probs.masked_fill(blocked, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=training)
    return pv(probs, v), probs


def _sdpa_mask(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor | None:
    """The additive float mask of ``F.scaled_dot_product_attention``'s mask arguments."""
    if is_causal:
        if attn_mask is not None:
            raise ValueError(
                "QuantScaledDotProductAttention: attn_mask and is_causal=True were both given; "
                "allowed one of them (as F.scaled_dot_product_attention)"
            )
        length, source = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
    if attn_mask is None or attn_mask.is_floating_point():
        return attn_mask if attn_mask is None else attn_mask.to(q.dtype)
    zeros = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
    return zeros.masked_fill(attn_mask.logical_not(), -math.inf)  # True: takes part


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a module (same arguments)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )


@register_quant_module(ScaledDotProductAttention)
class QuantScaledDotProductAttention(ScaledDotProductAttention):
    """Scaled dot-product attention with integer ``q·kᵀ`` and ``p·v`` (see the module
    docstring). A container of two `QuantMatMul` (``qk``, ``pv``), like
    `QuantMultiheadAttention`: `convert` and export treat them as the layers.

    Args:
        inputs: the activation scheme of q, k, v and of both products (the probabilities get
            it unsigned); None leaves everything float.
    """

    quantized_container: ClassVar[bool] = True  # traced as a leaf: it wires its children

    def __init__(self, inputs: QuantScheme | dict[str, Any] | None) -> None:
        super().__init__()
        self.qk, self.pv = attention_matmuls(QuantScheme.from_any(inputs))

    @classmethod
    def create(
        cls,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None = None,
    ) -> QuantScaledDotProductAttention:
        """Build from the activation scheme (``params`` is ignored: there is no weight).

        Example:
            >>> attention = QuantScaledDotProductAttention.create({"bits": 8, "signed": False})
        """
        return cls(inputs)

    @classmethod
    def from_float(
        cls, module: nn.Module, inputs: Any, params: Any = None
    ) -> QuantScaledDotProductAttention:
        """The quantized twin of a `ScaledDotProductAttention` (it holds no state)."""
        qmodule = cls(inputs)
        qmodule.training = module.training
        return qmodule

    def to_float(self) -> ScaledDotProductAttention:
        """The float module again."""
        module = ScaledDotProductAttention()
        module.training = self.training
        return module

    # -- what the report and surgery ask ---------------------------------------------------------
    def quantizers(self) -> Iterator[Quantizer]:
        """Every quantizer of its two matmuls."""
        yield from self.qk.quantizers()
        yield from self.pv.quantizers()

    @property
    def input_quantizers(self) -> list[Quantizer | None]:
        """The quantizers of its q, k and v inputs."""
        return [
            self.qk.input_quantizers[0],
            self.qk.input_quantizers[1],
            self.pv.input_quantizers[1],
        ]

    @property
    def param_quantizers(self) -> dict[str, Quantizer | None]:
        return {}

    @property
    def container_output(self) -> Quantizer | None:
        """The encoding of its output (``pv``'s output quantizer): input pruning reads it."""
        return self.pv.output_quantizers[0]

    def input_slots(self) -> list[tuple[QuantMatMul, list[int | None]]]:
        """Which of its arguments (query 0, key 1, value 2) each matmul's inputs are, for
        input pruning: ``qk`` takes q and kᵀ, ``pv`` the probabilities (None: made here)
        and v. (Transposing a per-tensor encoded k keeps its grid.)"""
        return [(self.qk, [0, 1]), (self.pv, [None, 2])]

    def _all_off(self) -> bool:
        """No quantizer would fake-quantize or observe (checked outside export only: the flags
        are buffers, and an exported graph always has the quantized form)."""
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            return False
        for q in self.modules():
            if not isinstance(q, Quantizer):
                continue
            observing = (q.training or q._calibrating) and bool(q.observer_enabled)
            if observing or bool(q.fake_quant_enabled):
                return False
        return True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """As ``F.scaled_dot_product_attention``, the two matmuls quantized."""
        if self._all_off():
            return super().forward(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
            )
        if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
            repeats = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(repeats, dim=-3)
            value = value.repeat_interleave(repeats, dim=-3)
        factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        mask = _sdpa_mask(attn_mask, is_causal, query, key)
        # F.scaled_dot_product_attention drops out whenever dropout_p > 0, in any mode
        out, _ = attention_core(
            self.qk, self.pv, query, key, value, factor, (mask,), dropout_p, True, True
        )
        return out
