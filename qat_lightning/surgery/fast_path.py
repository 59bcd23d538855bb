"""Float fast paths that would bypass quantized layers.

In eval mode without autograd, `nn.TransformerEncoderLayer.forward` hands its children's float
weights (``self.linear1.weight``, ...) to one fused kernel,
``torch._transformer_encoder_layer_fwd``, instead of calling them: its quantized ``linear1`` /
``linear2`` would silently not run, and after `convert` (integer layers hold no float
``weight``) it fails. The layer's ``activation_relu_or_gelu`` is read by that fast path alone;
setting it to 0 sends the layer down its ordinary path (the same math, through its children),
so it is turned off wherever a child is quantized, and the report says so.
"""

from __future__ import annotations

from torch import nn

from qat_lightning.nn import QuantModule


def disable_fast_paths(model: nn.Module) -> list[str]:
    """Turn off the fused eval fast path of each `nn.TransformerEncoderLayer` holding a
    quantized layer; returns their names."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.TransformerEncoderLayer):
            continue
        if not any(isinstance(m, QuantModule) for m in module.modules()):
            continue
        if getattr(module, "activation_relu_or_gelu", 0):
            module.activation_relu_or_gelu = 0
            names.append(name or "<model>")
    return names
