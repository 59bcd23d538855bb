"""Quantized Embedding: a table of quantized rows, looked up by (unquantized) integer indices."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.embedding_rows import looked_up_rows, rows_suffice
from qat_lightning.nn.grouped import table_rows
from qat_lightning.nn.integer import weight_qtensor
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import QTensor, QuantScheme


@register_quant_module(nn.Embedding)
class QuantEmbedding(QuantModule, nn.Embedding):
    """`nn.Embedding` with a fake-quantized table (per tensor, per row: axis 0, or per group
    along the embedding dimension) and output.

    Indices are not quantized (``input_quantizers = [None]``). ``max_norm`` is honoured as torch
    does it: the looked-up rows of the float table are renormalized in place before the table
    is quantized, in `forward` and `quantized_forward` alike. ``sparse=True`` is rejected: the
    fake quantizer's gradient is dense.

    Training fake-quantizes only the rows a batch looks up (`looked_up_rows`), with the same
    values and gradients as quantizing the whole table, where the encoding is per tensor, per
    row or per group along a row and not learnable; the observer still sees the whole table.
    """

    _quantized_params: ClassVar[dict[str, int]] = {"weight": 0}
    indexed_input: ClassVar[bool] = True

    @property
    def convert_as(self) -> str:  # type: ignore[override]
        """An integer table, unless ``max_norm`` renormalizes the float table at each lookup."""
        return "lookup" if self.max_norm is None else "op"

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        if self.sparse:
            raise ValueError(
                "QuantEmbedding: sparse=True is not supported (the weight's fake quantizer "
                "gives a dense gradient); allowed sparse=False"
            )
        super()._init_quantizers(inputs, params, outputs)
        self.input_quantizers = nn.ModuleList([None])  # indices are exact integers already

    def _renorm(self, indices: torch.Tensor) -> None:
        if self.max_norm is not None:
            with torch.no_grad():
                torch.embedding_renorm_(
                    self.weight, indices.contiguous(), self.max_norm, self.norm_type
                )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        self._renorm(indices)
        quantizer = self.param_quantizers["weight"]
        if quantizer is not None and rows_suffice(quantizer):
            return self.fq_output(
                looked_up_rows(
                    quantizer, self.weight, indices, self.padding_idx, self.scale_grad_by_freq
                )
            )
        rows = F.embedding(
            indices,
            self.fq_param("weight"),
            self.padding_idx,
            None,  # renormalized above, on the float table
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return self.fq_output(rows)

    def quantized_forward(self, indices: torch.Tensor) -> QTensor:
        """The dequantized rows at ``indices`` (an integer tensor), quantized to the output
        encoding (or, with no output quantizer and a per-tensor table, the table's codes)."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
            raise TypeError(
                f"QuantEmbedding.quantized_forward: indices must be an integer tensor, got "
                f"{getattr(indices, 'dtype', type(indices).__name__)}"
            )
        self._renorm(indices)
        q_w = weight_qtensor(self, self.weight)
        out = self.output_quantizers[0]
        if out is None:
            return table_rows(q_w, indices)
        return out.quantize(F.embedding(indices, q_w.dequantize()))
