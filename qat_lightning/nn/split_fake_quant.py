"""`Quantizer.forward` in its two halves, for layers that observe a tensor with one quantizer
but fake-quantize only part of it (`embedding_rows`), or fake-quantize it once for several
quantizers that hold the same encoding (self-attention's q, k and v inputs, `attention`).

`observe` is the first half of ``quantizer(x)`` (`Quantizer.observe`, then the
uncalibrated-use warning, as `Quantizer.forward` runs them); the caller then fake-quantizes
with the quantizer's encoding.
A quantizer with forward hooks (health probes, sensitivity counts) expects to be called, and
a subclass (`export.qdq.FrozenQuantizer`: QDQ nodes under ONNX export) has its own forward,
so callers take the plain path for those (`must_be_called`). The tests compare these paths
with the plain one, state and all, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.quant import Quantizer

_GLOBAL_HOOKS = (
    nn.modules.module._global_forward_hooks,
    nn.modules.module._global_forward_pre_hooks,
)


def hooked(module: nn.Module) -> bool:
    """``module`` (or every module, globally) has forward hooks that expect it to be called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or any(_GLOBAL_HOOKS))


def must_be_called(quantizer: Quantizer) -> bool:
    """``quantizer`` is a subclass (its own ``forward``) or has hooks: call it, do not split it."""
    return type(quantizer) is not Quantizer or hooked(quantizer)


def observe(quantizer: Quantizer, x: torch.Tensor) -> bool:
    """The first half of ``quantizer(x)`` for a non-learnable, non-dynamic scheme: observe
    ``x`` and update the encoding as `Quantizer.forward` does; returns whether fake
    quantization is on (the second half: fake-quantize with ``quantizer.scale`` and
    ``quantizer.zero_point``)."""
    fake_quant_enabled = quantizer.observe(x)
    if fake_quant_enabled and not quantizer._init_checked:
        quantizer._check_initialized()
    return fake_quant_enabled
