"""Quantized Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections).

``Conv1D(nf, nx)`` is a Linear with its weight transposed: ``y = x @ W + b`` with ``W`` of
shape ``(in, out) = (nx, nf)``. Its quantized family is a `QuantMAC` on that layout as it is:
the per-channel weight axis is 1 (the output features), the input channels lie along axis 0
(``mac_weight_input_axis``), the accumulator's channels along the last axis of the output.
The weight quantizer sees the parameter itself, so checkpoints, encodings (axis 1) and the
converted integer codes keep the ``(in, out)`` layout of a Hugging Face checkpoint.

``transformers`` is not imported by this package: the family is registered lazily
(`register_lazy_quant_module`) by the class's module path and name, and the quantized class,
``QuantHFConv1D``, is made the first time surgery meets a ``Conv1D`` (or a subclass), when
the user's model has imported ``transformers`` already.

Schemes: per-tensor and per-channel weights at any bit width, static activations. A per-group
weight scheme is refused (`GroupSizeError`; surgery names the layer): groups run along a
Linear's input dimension, the last axis of its weight, here the first, and the per-group
integer forms (`nn.grouped.grouped_linear`, convert's ``MatMulNBitsLinear``) are Linear
forms. The way there is the ``nn.Linear(nx, nf)`` a ``Conv1D`` is, weight transposed (the
LM experiment's ``experiments/lm_models.conv1d_to_linear``). A dynamic activations scheme
leaves its activations float (weight-only), as for the other non-Linear MAC layers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.nn.linear import QuantMAC, matmul_bias
from qat_lightning.nn.registry import register_lazy_quant_module
from qat_lightning.quant import QuantScheme
from qat_lightning.quant.grouped import GroupSizeError

HF_MODULE = "transformers.pytorch_utils"
HF_NAME = "Conv1D"


class QuantHFConv1DMixin(QuantMAC):
    """The layer protocol of a quantized ``Conv1D``; ``QuantHFConv1D`` is this mixin and the
    float ``Conv1D`` (made by `make_quant_hf_conv1d`)."""

    _quantized_params: ClassVar[dict[str, int]] = {"weight": 1}  # weight (in, out)
    mac_output_axis: ClassVar[int] = -1
    mac_weight_input_axis: ClassVar[int] = 0
    mac_float32_exact: ClassVar[bool] = True  # a GEMM: float32 sums exact below 2**24

    @staticmethod
    def mac_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b, *extra: Any):
        """``x @ w + b`` for ``x`` of shape ``(..., in)`` and ``w`` of shape ``(in, out)``
        (`matmul_bias`: exported 2-D with its bias, so that onnxruntime fuses one QGemm)."""
        return matmul_bias(x, w, b)

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        if params is not None and params.per_group:
            raise GroupSizeError(
                f"Conv1D.weight of shape {tuple(self.weight.shape)} (in, out): per_group "
                f"(group_size={params.group_size}) is not supported for transformers' Conv1D; "
                "allowed per_tensor or per_channel, or replace it by the nn.Linear(nx, nf) "
                "it is (weight transposed), which takes per_group"
            )
        super()._init_quantizers(inputs, params, outputs)

    # Conv1D's own ``__repr__`` prints only its sizes; show the quantizers too.
    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def make_quant_hf_conv1d(conv1d: type[nn.Module]) -> type[nn.Module]:
    """The quantized type of ``conv1d`` (transformers' ``Conv1D`` class): bases
    ``(QuantHFConv1DMixin, conv1d)``, findable by pickle as ``qat_lightning.nn.hf_conv1d.
    QuantHFConv1D`` in the process that made it."""
    name = "QuantHFConv1D"
    doc = f"{conv1d.__module__}.{conv1d.__qualname__} with fake-quantized input, weight, output."
    cls = type(QuantHFConv1DMixin)(name, (QuantHFConv1DMixin, conv1d), {"__doc__": doc})
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


register_lazy_quant_module(HF_MODULE, HF_NAME, make_quant_hf_conv1d)
