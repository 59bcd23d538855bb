"""`Quantizer.forward` in its two halves, for layers that observe a tensor with one quantizer
but fake-quantize only part of it (`embedding_rows`), or fake-quantize it once for several
quantizers that hold the same encoding (self-attention's q, k and v inputs, `attention`).

`observe` is the first half of ``quantizer(x)`` (`Quantizer.observe`, then the
uncalibrated-use warning, as `Quantizer.forward` runs them); the caller then fake-quantizes
with the quantizer's encoding. `after_relu` is ``quantizer(relu(y))`` that way: fused ReLU
layers observe ``relu(y)`` and fake-quantize it in one autograd node with ReLU's gradient.
A quantizer with forward hooks (health probes, sensitivity counts) expects to be called, and
a subclass (`export.qdq.FrozenQuantizer`: QDQ nodes under ONNX export) has its own forward,
so callers take the plain path for those (`must_be_called`). The tests compare these paths
with the plain one, state and all, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_lightning.quant import Quantizer, cpu_fake_quant
from qat_lightning.quant.functional import fake_quantize

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


def after_relu(quantizer: Quantizer, y: torch.Tensor) -> torch.Tensor:
    """``quantizer(torch.relu(y))``, the same values, gradient and quantizer state. While
    training on the CPU (8-bit per-tensor static scheme, observer on) it is one autograd node
    that keeps one boolean mask for ReLU's and the fake quant's gradients, where ReLU alone
    would keep its float output: a quarter of the memory for backward
    (`cpu_fake_quant.fake_quantize_after_relu`). Callers check `must_be_called` first."""
    s = quantizer.scheme
    if (
        s.dynamic
        or s.learnable
        or s.representation == "fixed_point"
        or s.multi_scale
        or not (torch.is_grad_enabled() and y.requires_grad)
    ):
        return quantizer(torch.relu(y))
    with torch.no_grad():
        relu_y = torch.relu(y)
    if not observe(quantizer, relu_y):
        return torch.relu(y)  # fake quantization off
    scale, zero_point, observed = quantizer.scale, quantizer.zero_point, quantizer._observed_range
    encoding = quantizer._host_encoding
    out = cpu_fake_quant.fake_quantize_after_relu(
        y, relu_y, scale, zero_point, s.qmin, s.qmax, observed, encoding
    )
    if out is not None:
        return out
    return fake_quantize(
        torch.relu(y), scale, zero_point, s, batch_range=observed, encoding=encoding
    )
