"""Hugging Face ``transformers`` attention through `QuantScaledDotProductAttention`.

A transformers attention layer (``BertSelfAttention``, ``GPT2Attention``, ...) computes its
attention in a function it looks up by name at every call:
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)(self, q, k, v,
mask, dropout=..., scaling=..., ...)``. torch.fx cannot trace that code, so surgery cannot
rewrite the ``F.scaled_dot_product_attention`` call inside it. transformers' own extension
point can: `route_attention` registers one more attention implementation,
``"qat_lightning_sdpa"`` (`AttentionInterface.register`, with ``sdpa``'s mask function in the
`AttentionMaskInterface`), gives each attention layer a `QuantScaledDotProductAttention` child
(``quantized_sdpa``), and sets the layer's config to that implementation. The function,
`quantized_sdpa_forward`, is transformers' ``sdpa_attention_forward`` with the
``F.scaled_dot_product_attention`` call going to the layer's child: the same mask, causal,
scaling, dropout and grouped-query rules, so with the child's quantizers off it computes what
``sdpa`` computes, bit for bit (the child then calls the float function itself). A layer without
the child (skipped, or another model sharing the config) runs ``sdpa`` itself.

Why this way: no monkey-patching of torch or transformers (a new name in transformers'
registries, used only by the configs surgery sets), nothing imported at import time (this runs
only where ``transformers`` is in ``sys.modules`` already: the user's model imported it), and
the projections around the attention stay the layers surgery swaps anyway.

Only the ``sdpa`` implementation (transformers' default with torch 2) is routed: a layer whose
config asks for another (``eager``, flash, flex) keeps it, and the report says so with the
fix (``model.set_attn_implementation("sdpa")`` before `quantize_model`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat_lightning.nn.sdpa import QuantScaledDotProductAttention
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.graph import join
from qat_lightning.surgery.report import ATTENTION_SOFTMAX

IMPLEMENTATION = "qat_lightning_sdpa"
CHILD = "quantized_sdpa"
_ROUTED = ("sdpa", IMPLEMENTATION)
_USES_INTERFACE: dict[type, bool] = {}


def _uses_attention_interface(module: nn.Module) -> bool:
    """``module`` is a transformers layer that calls its attention through the interface."""
    cls = type(module)
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    config = getattr(module, "config", None)
    return _USES_INTERFACE[cls] and isinstance(getattr(config, "_attn_implementation", None), str)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformers attention layers of ``model`` (none if transformers is not imported)."""
    if "transformers" not in sys.modules:
        return []
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__module__.startswith("transformers.") and _uses_attention_interface(m)
    ]


def _transformers(module: str) -> Any:
    """``transformers.<module>``, imported when surgery meets a transformers model (so the
    user's code has imported transformers already); the package has no import of it."""
    return importlib.import_module(f"transformers.{module}")


def register_implementation() -> None:
    """Register ``"qat_lightning_sdpa"`` with transformers' attention and mask interfaces
    (idempotent; imports transformers, which the caller's model has imported already)."""
    masks = _transformers("masking_utils")
    _transformers("modeling_utils").AttentionInterface.register(
        IMPLEMENTATION, quantized_sdpa_forward
    )
    masks.AttentionMaskInterface.register(IMPLEMENTATION, masks.sdpa_mask)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer``'s attention cannot be routed (None: it can)."""
    implementation = layer.config._attn_implementation
    if implementation in _ROUTED:
        return None
    return (
        f"its config's attention implementation is {implementation!r}; allowed 'sdpa' "
        "(call model.set_attn_implementation('sdpa') before quantize_model)"
    )


@dataclass
class Plan:
    """What surgery does with one attention layer's attention: its report row (``name``,
    ``status``, ``fields``), the quantized module to attach (None: it stays as it is) and a
    warning for the report."""

    name: str
    layer: nn.Module
    status: str
    fields: dict[str, Any] = field(default_factory=dict)
    module: QuantScaledDotProductAttention | None = None
    warning: str = ""


def plan(model: nn.Module, config: QuantConfig) -> list[Plan]:
    """One `Plan` per transformers attention layer of ``model``, by ``config``'s schemes,
    skip patterns and overrides (on the name ``<layer>.quantized_sdpa``)."""
    plans = []
    for name, layer in attention_layers(model):
        full = join(name, CHILD)
        where = f"{type(layer).__name__}'s attention, called through transformers' interface"
        fields: dict[str, Any] = {"before": "scaled_dot_product_attention()"}
        inputs, _ = config.schemes_for(full)
        pattern = config.skip_pattern(full)
        reason = unsupported_reason(layer)
        if pattern is not None:
            fields["note"] = f"{where}: matches skip pattern {pattern!r}"
            plans.append(Plan(full, layer, "skipped", fields))
        elif reason is not None or inputs is None:
            fields["note"] = f"{where}: {reason or 'inputs scheme None'}"
            warning = f"the attention of {name!r} stays float: {reason}" if reason else ""
            plans.append(Plan(full, layer, "float", fields, warning=warning))
        else:
            module = QuantScaledDotProductAttention.create(inputs)
            fields.update(after=type(module).__name__, inputs=inputs)
            fields["note"] = f"{where}: attn_implementation {IMPLEMENTATION!r}; {ATTENTION_SOFTMAX}"
            plans.append(Plan(full, layer, "quantized", fields, module))
    return plans


def route(layer: nn.Module, attention: QuantScaledDotProductAttention) -> None:
    """Give ``layer`` its quantized attention and switch its config to the routed function."""
    register_implementation()
    layer.add_module(CHILD, attention.train(layer.training))  # in the layer's mode
    # This config only (not recursively into sub-configs, whose layers are planned on their own)
    config = layer.config
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = IMPLEMENTATION
    else:
        config._attn_implementation = IMPLEMENTATION


def quantized_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward`` (same arguments, same result) whose scaled
    dot-product attention is ``module.quantized_sdpa``; ``module`` without one runs ``sdpa``."""
    hf = _transformers("integrations.sdpa_attention")
    attention = module._modules.get(CHILD)
    if not isinstance(attention, QuantScaledDotProductAttention):
        return hf.sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal,
            position_bias, **kwargs,
        )  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__}: attention with softcap is not supported by "
            f"{IMPLEMENTATION} (nor by 'sdpa'); allowed softcap=None"
        )
    enable_gqa, groups = False, getattr(module, "num_key_value_groups", 1)
    if groups > 1 and hf.use_gqa_in_sdpa(attention_mask, key, value):
        enable_gqa = True  # (the quantized attention repeats k and v heads as repeat_kv does)
    elif groups > 1:
        key, value = hf.repeat_kv(key, groups), hf.repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
        is_causal = is_causal.item()
    if is_causal and kv_length > q_length:  # an empty static cache: attend to the first keys
        key, value = key[:, :, :q_length, :], value[:, :, :q_length, :]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_length]
    if position_bias is not None:
        attention_mask = hf.create_position_bias_mask(
            position_bias, attention_mask, is_causal, query, key
        )
        is_causal = False
    out = attention(
        query, key, value, attention_mask, dropout, is_causal, scale=scaling, enable_gqa=enable_gqa
    )
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None
