"""Per-quantizer health figures: scale, zero point, clip rate and SQNR of what passes through.

`HealthProbe` hooks every `Quantizer` for one forward pass and turns what it saw into a flat
dict of metrics, ``"quant/<layer>.<quantizer>/<figure>"``, that any Lightning logger takes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat_lightning.quant import Quantizer
from qat_lightning.quant.functional import expand_encoding, fake_quantize


def named_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def tensor_health(quantizer: Quantizer, x: torch.Tensor) -> dict[str, float]:
    """Clip rate (share of elements outside the representable range) and SQNR in dB."""
    x = x.detach().float()
    scheme = quantizer.scheme
    scale, zero_point = quantizer.encoding(x)  # a dynamic scheme's: that of x itself
    scale_b = expand_encoding(scale, x.dim(), scheme)
    zp_b = expand_encoding(zero_point, x.dim(), scheme)
    lo = (scheme.qmin - zp_b) * scale_b
    hi = (scheme.qmax - zp_b) * scale_b
    clip_rate = ((x < lo) | (x > hi)).float().mean().item()
    fq = fake_quantize(x, scale, zero_point, scheme.replace(learnable=False))
    signal = x.pow(2).sum().item()
    noise = (x - fq).pow(2).sum().item()
    sqnr = 10.0 * math.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
    return {"clip_rate": clip_rate, "sqnr_db": min(sqnr, 200.0)}


class HealthProbe:
    """Collects health figures from every quantizer during the forward passes it is attached.

    Example:
        >>> probe = HealthProbe(model).attach()
        >>> model(x)
        >>> metrics = probe.detach()
    """

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = named_quantizers(model)
        self._handles: list = []
        self._seen: dict[str, dict[str, float]] = {}

    def attach(self) -> HealthProbe:
        for name, quantizer in self.quantizers:
            self._handles.append(quantizer.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: Quantizer, args, output) -> None:
            fresh = name not in self._seen and args and torch.is_tensor(args[0])
            if fresh and module.is_initialized and args[0].numel() > 0:
                self._seen[name] = tensor_health(module, args[0])

        return hook

    def detach(self) -> dict[str, float]:
        """Remove the hooks and return the metrics, including every quantizer's encoding."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        metrics: dict[str, float] = {}
        for name, quantizer in self.quantizers:
            if not quantizer.is_initialized:
                continue
            if not quantizer.scheme.dynamic:  # a dynamic scale is each batch's own: none here
                scale, zero_point = quantizer.encoding()
                metrics[f"quant/{name}/scale"] = scale.float().mean().item()
                metrics[f"quant/{name}/zero_point"] = zero_point.float().mean().item()
            for key, value in self._seen.get(name, {}).items():
                metrics[f"quant/{name}/{key}"] = value
        self._seen.clear()
        return metrics
