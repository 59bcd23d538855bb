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
from qat_lightning.nn.attention import QuantMultiheadAttention


def disable_fast_paths(model: nn.Module) -> list[str]:
    """Turn off the float fast paths that would bypass quantized layers; returns one report
    line for each path turned off.

    - Each `nn.TransformerEncoderLayer` holding a quantized layer: its fused eval path.
    - Each `nn.TransformerEncoder` holding a quantized attention: in eval it turns a padded
      batch into a nested tensor, which only torch's fused layer takes.
    """
    lines = []
    for name, module in model.named_modules():
        label = repr(name or "<model>")
        if isinstance(module, nn.TransformerEncoderLayer):
            quantized = any(isinstance(m, QuantModule) for m in module.modules())
            if quantized and getattr(module, "activation_relu_or_gelu", 0):
                module.activation_relu_or_gelu = 0
                lines.append(
                    f"{label} (TransformerEncoderLayer): its fused eval fast path, which "
                    "reads its children's float weights, is turned off so that its quantized "
                    "layers run"
                )
        elif (
            isinstance(module, nn.TransformerEncoder)
            and module.use_nested_tensor
            and any(isinstance(m, QuantMultiheadAttention) for m in module.modules())
        ):
            module.use_nested_tensor = False
            lines.append(
                f"{label}: use_nested_tensor set to False (torch's nested-tensor fast path "
                "would bypass the quantized attention)"
            )
    return lines
