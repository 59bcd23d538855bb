"""Quantized `nn.MultiheadAttention`: integer projections and integer attention matmuls.

`QuantMultiheadAttention` is an `nn.MultiheadAttention` whose ``forward`` is written out from
quantized pieces, so integer eval, `convert` and ONNX export follow from their protocols:

- ``q_proj`` / ``k_proj`` / ``v_proj``: `QuantInProjection`, a `QuantLinear` MAC whose weight is
  its rows of the attention's own ``in_proj_weight`` (or ``q/k/v_proj_weight`` when ``kdim`` /
  ``vdim`` differ) and bias its slice of ``in_proj_bias``; the parameters stay the attention's.
- ``qk``: `QuantMatMul` of the projected q and kᵀ (per head); scaling by ``1/sqrt(head_dim)``,
  the masks and softmax run in float on its dequantized output.
- ``pv``: `QuantMatMul` of the softmax output (its input 0, quantized **unsigned**) and v.
  These two and what runs between them are `nn.sdpa.attention_core`, the one quantized
  attention core (`QuantScaledDotProductAttention` computes with it too).
- ``out_proj``: the attention's own out-projection, quantized as `QuantLinear`.

``add_bias_kv`` and ``add_zero_attn`` are refused (`from_float` raises `ValueError`; surgery
leaves the layer float with that reason). The module carries a no-op forward pre-hook: torch's
`nn.TransformerEncoderLayer` eval fast path (``torch._transformer_encoder_layer_fwd``), which
reads the weights without calling the submodules, is not taken by a layer holding hooks.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.linear import QuantLinear, matmul_bias
from qat_lightning.nn.registry import register_quant_module, specialise, unregistered_reason
from qat_lightning.nn.sdpa import attention_core, attention_matmuls
from qat_lightning.nn.split_fake_quant import hooked, must_be_called, observe
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.quant.functional import fake_quantize

_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_CHILDREN = ("q_proj", "k_proj", "v_proj", "qk", "pv")


def _keep_off_fast_paths(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: torch's fused transformer fast paths are not taken
    by a layer whose modules hold hooks, so the quantized submodules are always called."""
    return None


def _weight_quantizer(params: QuantScheme | None, weight_t: torch.Tensor) -> Quantizer | None:
    """A quantizer for a transposed ``(in, out)`` weight: per output channel along axis 1."""
    if params is None:
        return None
    scheme = params.replace(axis=1) if params.per_channel else params
    channels = weight_t.shape[1] if params.per_channel else None
    return Quantizer(scheme, num_channels=channels).to(weight_t.device)


class QuantOutProjection(QuantLinear):
    """A linear layer quantized with its weight stored transposed, ``(in, out)``: ``x @ w``.

    Why: exported as ``DequantizeLinear(w) -> Transpose -> MatMul`` (the ``F.linear`` form),
    onnxruntime 1.2x fuses the Transpose into a float ``FusedMatMul`` for square weights, and
    the projection runs in float; ``DequantizeLinear(wᵀ) -> MatMul`` fuses to an integer kernel.
    """

    mac_weight_input_axis: ClassVar[int] = 0
    _quantized_params: ClassVar[dict[str, int]] = {"weight": 1}

    @classmethod
    def from_float(cls, module: nn.Module, inputs, params) -> QuantOutProjection:
        qmodule = super().from_float(module, inputs, params)
        weight, _ = qmodule.weight_and_bias()
        qmodule.param_quantizers["weight"] = _weight_quantizer(QuantScheme.from_any(params), weight)
        return qmodule

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight.t(), self.bias

    @staticmethod
    def mac_op(layer: nn.Module, x, w, b, *extra: Any) -> torch.Tensor:
        return matmul_bias(x, w, b)


class QuantInProjection(QuantOutProjection):
    """The q, k or v projection of an attention (``index`` 0, 1, 2): rows
    ``index * E ... (index + 1) * E`` of its packed ``in_proj_weight`` (or its separate
    ``q/k/v_proj_weight``) and of ``in_proj_bias``, as a quantized linear layer.

    It holds no parameter: ``weight_and_bias`` reads them from the attention (a plain
    reference, not a submodule), so they stay the attention's parameters and its checkpoint
    keys; it owns the input, weight and output quantizers of its projection.
    """

    @classmethod
    def create(
        cls,
        owner: nn.MultiheadAttention,
        index: int,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
    ) -> QuantInProjection:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.__dict__["_owner"] = owner
        layer.index = index
        layer.register_parameter("weight", None)  # (the attention's; see weight_and_bias)
        layer.register_parameter("bias", None)
        weight_t, _ = layer.weight_and_bias()
        layer.in_features, layer.out_features = weight_t.shape
        layer._init_quantizers(inputs, None)
        quantizer = _weight_quantizer(params, weight_t)
        layer.param_quantizers = nn.ModuleDict({"weight": quantizer})
        layer.training = owner.training
        return layer

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        owner, i = self.__dict__["_owner"], self.index
        e = owner.embed_dim
        if owner._qkv_same_embed_dim:
            weight = owner.in_proj_weight[i * e : (i + 1) * e]
        else:
            weight = getattr(owner, _SEPARATE[i])
        bias = owner.in_proj_bias
        return weight.t(), None if bias is None else bias[i * e : (i + 1) * e]

    def forward_quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quant ``forward`` of an input already fake-quantized with this layer's own
        input encoding (`shared_self_attention_input`)."""
        weight, bias = self.weight_and_bias()
        y = self.mac_op(self, x, self.fq_param("weight", weight), self.fq_bias(bias))
        return self.fq_output(F.relu(y) if self.output_relu else y)

    def extra_repr(self) -> str:
        owner = self.__dict__["_owner"]
        return (
            f"{'qkv'[self.index]} projection of the attention: in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={owner.in_proj_bias is not None}"
        )


def shared_self_attention_input(
    projections: tuple[QuantInProjection, ...], x: torch.Tensor
) -> list[torch.Tensor] | None:
    """Self-attention's q, k and v inputs are one tensor: each projection's input quantizer
    observes it as when called, but equal encodings fake-quantize it once (what each would
    compute, bit for bit; the gradient is summed before the one clip mask, not after each).

    None (each projection quantizes its input itself) in integer mode, in `convert`'s model,
    while compiling, for learnable or dynamic schemes, schemes that differ, and quantizers or
    projections with hooks (a probe expects its call). Where the three encodings do not all
    agree, each is applied on its own (after the same observations)."""
    if not all(isinstance(p, QuantInProjection) for p in projections):
        return None  # (`convert`'s integer layers)
    quantizers = [p.input_quantizers[0] for p in projections]
    first = quantizers[0]
    if first is None or torch.compiler.is_compiling():
        return None
    if any(p.runs_integer((x,)) or hooked(p) for p in projections):
        return None
    scheme = first.scheme
    if scheme.learnable or scheme.dynamic:
        return None
    if any(q is None or q.scheme != scheme or must_be_called(q) for q in quantizers):
        return None
    enabled = [observe(q, x) for q in quantizers]
    if not any(enabled):
        return [x, x, x]
    # All three or none: two sharing one fake quant and one apart would sum the input's
    # gradient in another order than three apart.
    agree = all(enabled) and all(
        torch.equal(q.scale, first.scale) and torch.equal(q.zero_point, first.zero_point)
        for q in quantizers[1:]
    )
    if agree:
        return [fake_quantize(x, first.scale, first.zero_point, scheme)] * 3
    return [
        fake_quantize(x, q.scale, q.zero_point, scheme) if on else x
        for q, on in zip(quantizers, enabled, strict=True)
    ]


def _as_float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed to attend) as an additive float mask."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _quantize_once(attention: QuantMultiheadAttention) -> None:
    """q, k and v reach ``qk`` / ``pv``, and ``pv``'s output reaches ``out_proj``, through
    reshapes and transposes only, which keep a per-tensor grid: those inputs are quantized
    once, by their producer's output quantizer, as surgery prunes between modules (the
    container is a leaf to surgery's graph, so it wires this itself). Without it each of these
    tensors is fake-quantized twice a step, observed twice, and rounded twice."""
    for consumer, index, producer in (
        (attention.qk, 0, attention.q_proj),
        (attention.qk, 1, attention.k_proj),
        (attention.pv, 1, attention.v_proj),
        (attention.out_proj, 0, attention.pv),
    ):
        source = producer.output_quantizers[0]
        own = consumer.input_quantizers[index]
        if source is None or own is None or source.scheme.granularity != "per_tensor":
            continue  # a per-channel or per-token grid does not survive the transposes
        if source.scheme.dynamic or source.scheme != own.scheme:
            continue
        consumer.input_quantizers[index] = None
        consumer.set_input_source(index, source)


@register_quant_module(nn.MultiheadAttention)
class QuantMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` computed by quantized projections and matmuls (see the module
    docstring). A container of quantized modules, not a `QuantModule` itself: surgery, `convert`
    and export treat its children as layers; it answers ``quantizers``, ``input_quantizers``
    and ``param_quantizers`` for the report."""

    quantized_container: ClassVar[bool] = True  # traced as a leaf: its children are wired here

    @classmethod
    def from_float(
        cls,
        module: nn.MultiheadAttention,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
    ) -> QuantMultiheadAttention:
        """A quantized twin of ``module`` sharing its parameters (and its ``out_proj``'s)."""
        name = type(module).__name__
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError(f"{name}: add_bias_kv=True is not supported; allowed: False")
        if module.add_zero_attn:
            raise ValueError(f"{name}: add_zero_attn=True is not supported; allowed: False")
        inputs, params = QuantScheme.from_any(inputs), QuantScheme.from_any(params)
        qmodule = cls.__new__(cls)
        nn.Module.__init__(qmodule)
        skip = ("_parameters", "_buffers", "_modules")
        qmodule.__dict__.update(
            {
                k: (copy.copy(v) if isinstance(v, dict) else v)
                for k, v in module.__dict__.items()
                if k not in skip
            }
        )
        qmodule._parameters = dict(module._parameters)
        qmodule._buffers = dict(module._buffers)
        qmodule._modules = dict(module._modules)
        out = module.out_proj
        if not isinstance(out, nn.Linear) or unregistered_reason(out) is not None:
            raise ValueError(
                f"{name}: out_proj ({type(out).__name__}) is not an nn.Linear (or a subclass "
                "that keeps Linear's forward); allowed: nn.Linear"
            )
        out_type = QuantOutProjection
        if type(out) is not nn.Linear:
            out_type = specialise(QuantOutProjection, type(out))
        qmodule.out_proj = out_type.from_float(module.out_proj, inputs, params)
        for i, child in enumerate(("q_proj", "k_proj", "v_proj")):
            setattr(qmodule, child, QuantInProjection.create(qmodule, i, inputs, params))
        qmodule.qk, qmodule.pv = attention_matmuls(inputs)  # (the softmax output unsigned)
        if inputs is not None:
            _quantize_once(qmodule)
        hook = qmodule.register_forward_pre_hook(_keep_off_fast_paths)
        qmodule.__dict__["_fast_path_hook"] = hook.id
        qmodule.training = module.training
        return qmodule

    # -- what the report and surgery ask ---------------------------------------------------------
    def _quant_children(self) -> list[QuantModule]:
        return [m for m in self.children() if isinstance(m, QuantModule)]

    def quantizers(self):
        """Every quantizer of its quantized children."""
        for child in self._quant_children():
            yield from child.quantizers()

    @property
    def input_quantizers(self) -> list[Quantizer | None]:
        """The quantizers of its q, k and v inputs."""
        return [getattr(self, c).input_quantizers[0] for c in ("q_proj", "k_proj", "v_proj")]

    @property
    def param_quantizers(self) -> dict[str, Quantizer | None]:
        """Weight quantizers by the attention's parameter names."""
        found = {"out_proj.weight": self.out_proj.param_quantizers["weight"]}
        names = ("in_proj_weight",) * 3 if self._qkv_same_embed_dim else _SEPARATE
        for child, name in zip(("q_proj", "k_proj", "v_proj"), names, strict=True):
            key = name if not self._qkv_same_embed_dim else f"{name}[{child[0]}]"
            found[key] = getattr(self, child).param_quantizers["weight"]
        return found

    def finish_convert(self) -> None:
        """In `convert`'s copy, once its children are converted: drop the float in-projection
        parameters the integer q/k/v layers now hold as codes (kept where a projection still
        computes from them, i.e. runs in fake quant)."""
        projections = [getattr(self, c) for c in ("q_proj", "k_proj", "v_proj")]
        if any(isinstance(m, QuantInProjection) for p in projections for m in p.modules()):
            return
        for name in ("in_proj_weight", "in_proj_bias", *_SEPARATE):
            if self._parameters.get(name) is not None:
                self._parameters[name] = None

    def to_float(self) -> nn.MultiheadAttention:
        """The float `nn.MultiheadAttention` again, with the same parameters."""
        module = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        module.__dict__.update(
            {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        )
        module.__dict__.pop("_fast_path_hook", None)
        module._forward_pre_hooks.pop(self.__dict__.get("_fast_path_hook"), None)
        module._modules = {k: v for k, v in self._modules.items() if k not in _CHILDREN}
        module._modules["out_proj"] = self.out_proj.to_float()
        module._parameters = dict(self._parameters)
        return module

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `nn.MultiheadAttention.forward` (``is_causal`` is a hint that ``attn_mask`` is
        causal, and needs it, as there)."""
        if is_causal and attn_mask is None:
            raise RuntimeError(
                f"{type(self).__name__}: is_causal=True needs attn_mask (the causal mask), as "
                "nn.MultiheadAttention does"
            )
        if query.is_nested:
            raise ValueError(f"{type(self).__name__}: nested tensor inputs are not supported")
        self_attention = query is key and key is value  # (before the reshapes below)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if self.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not self.batch_first:  # internally (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        shared = None
        if self_attention:
            shared = shared_self_attention_input(projections, query)
        if shared is None:
            q, k, v = (p(x) for p, x in zip(projections, (query, key, value), strict=True))
        else:
            q, k, v = (
                p.forward_quantized_input(x) for p, x in zip(projections, shared, strict=True)
            )
        q = q.reshape(n, tgt, h, d).transpose(1, 2)
        k = k.reshape(n, src, h, d).transpose(1, 2)
        v = v.reshape(n, src, h, d).transpose(1, 2)
        mask = _as_float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(n, h, tgt, src)
        padding = _as_float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.reshape(n, 1, 1, src)
        out, probs = attention_core(
            self.qk, self.pv, q, k, v, 1.0 / math.sqrt(d), (mask, padding),
            self.dropout, self.training,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(n, tgt, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights
