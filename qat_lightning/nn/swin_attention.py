"""Quantized torchvision ``ShiftedWindowAttention`` (Swin's window attention).

torchvision's ``ShiftedWindowAttention.forward`` calls the function
``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...)``: its ``qkv`` and
``proj`` Linears are never called, so swapping them alone quantizes nothing. Its quantized
family is a container (as `QuantMultiheadAttention`) whose ``forward`` is the shifted-window
attention written out here from quantized pieces:

1. pad ``(B, H, W, C)`` at the bottom/right to multiples of the window, cyclically shift by
   ``-shift_size`` (no shift along a side whose window covers the padded map), partition into
   ``nW`` windows of ``N = wh * ww`` tokens;
2. ``qkv``: the attention's own ``qkv`` Linear, quantized (`QuantOutProjection`: weight stored
   transposed, so onnxruntime fuses it to an integer MatMul);
3. ``qk`` / ``pv``: the shared pair of `QuantMatMul` of `nn.sdpa.attention_core` on
   ``(B, nW, heads, N, head_dim)``: ``softmax(qk(q, kᵀ) * head_dim**-0.5 + bias + mask)``
   then ``pv`` (the probabilities unsigned). The q scaling is applied to the product, not to
   q before it (equal up to float rounding), so q keeps the grid of ``qkv``'s output;
4. ``proj``: the attention's ``proj`` Linear, quantized the same way; dropout; reverse the
   windows, the shift and the padding.

What stays float, by design: the relative-position-bias table (a parameter of the container,
``(2wh-1)(2ww-1) x heads``, added to the scores in float) and the shift mask (``0`` / ``-100``
between tokens of different regions, made from the padded size at each call). `convert`
keeps both float and `export.report.layer_report` lists the container's own float parameter.

torchvision is not imported by this package: the family is registered lazily
(`register_lazy_quant_module`) by module path and class name, the quantized class made the
first time surgery meets a ``ShiftedWindowAttention``. ``ShiftedWindowAttentionV2`` (Swin
V2: cosine attention, continuous position bias) is registered the same way, with its own
family (`QuantShiftedWindowAttentionV2Mixin`; its position-bias MLP ``cpb_mlp`` stays float
and `convert` folds it to the bias it computes).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.nn.attention import QuantOutProjection
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.linear import QuantLinear
from qat_lightning.nn.registry import register_lazy_quant_module, specialise, unregistered_reason
from qat_lightning.nn.sdpa import attention_core, attention_matmuls
from qat_lightning.quant import Quantizer, QuantScheme

SWIN_MODULE = "torchvision.models.swin_transformer"
SWIN_NAME = "ShiftedWindowAttention"
SWIN_V2_NAME = "ShiftedWindowAttentionV2"
_CHILDREN = ("qkv", "proj", "qk", "pv")
MASK_VALUE = -100.0  # torchvision's value between tokens of different shifted regions


def _regions(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Region label (0, 1, 2) of each row (column) of a padded map cyclically shifted by
    ``shift``: the rows that wrapped around are 2, the last window before them 1, the rest 0.
    Without a shift everything is one region."""
    i = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(i)
    return torch.where(i >= size - shift, 2, (i >= size - window).long())


def shift_mask(
    padded: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask ``(nW, N, N)`` of a shifted window attention: ``-100`` between two
    tokens of a window that come from different regions of the shifted map, else ``0``."""
    (ph, pw), (wh, ww) = padded, window
    labels = _regions(ph, wh, shift[0], device)[:, None] * 3 + _regions(pw, ww, shift[1], device)
    labels = labels.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    different = labels[:, :, None] != labels[:, None, :]
    zeros = torch.zeros(different.shape, dtype=dtype, device=device)
    return zeros.masked_fill(different, MASK_VALUE)


def relative_position_bias(
    table: torch.Tensor, index: torch.Tensor, window: tuple[int, int]
) -> torch.Tensor:
    """The bias ``(heads, N, N)`` of every token pair of a window, gathered from ``table``
    (``(2wh-1)(2ww-1), heads``) by the flat pair index ``index`` (``N * N``)."""
    n = window[0] * window[1]
    return table[index].view(n, n, -1).permute(2, 0, 1)


class QuantQKVProjectionV2(QuantOutProjection):
    """Swin V2's ``qkv``: the key third of its bias is zero in every forward (torchvision
    clones the bias and zeroes that third), so keys carry no bias and that third no gradient."""

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = super().weight_and_bias()
        if bias is None:
            return weight, bias
        n = bias.numel() // 3
        return weight, torch.cat([bias[:n], torch.zeros_like(bias[n : 2 * n]), bias[2 * n :]])


def _projection(
    linear: nn.Module,
    inputs: QuantScheme | None,
    params: QuantScheme | None,
    qtype: type[QuantLinear] = QuantOutProjection,
):
    """``linear`` (the attention's ``qkv`` or ``proj``) as a `QuantOutProjection`."""
    if not isinstance(linear, nn.Linear) or unregistered_reason(linear) is not None:
        raise ValueError(
            f"ShiftedWindowAttention: its projection is a {type(linear).__name__}, not an "
            "nn.Linear (or a subclass that keeps Linear's forward); allowed: nn.Linear"
        )
    if type(linear) is not nn.Linear:
        qtype = specialise(qtype, type(linear))
    return qtype.from_float(linear, inputs, params)


def _quantize_once(attention: nn.Module, queries_keys: bool = True) -> None:
    """q, k and v reach ``qk`` / ``pv`` from ``qkv``'s output, and ``pv``'s output reaches
    ``proj``, through reshapes, permutes and indexing only, which keep a per-tensor grid:
    those inputs are quantized once, by their producer's output quantizer (the container is a
    leaf to surgery's graph, so it wires this itself, as `QuantMultiheadAttention` does).
    Not q and k where they are normalised first (``queries_keys=False``, Swin V2)."""
    pairs = [(attention.pv, 1, attention.qkv), (attention.proj, 0, attention.pv)]
    if queries_keys:
        pairs += [(attention.qk, 0, attention.qkv), (attention.qk, 1, attention.qkv)]
    for consumer, index, producer in pairs:
        source = producer.output_quantizers[0]
        own = consumer.input_quantizers[index]
        if source is None or own is None or source.scheme.granularity != "per_tensor":
            continue
        if source.scheme.dynamic or source.scheme != own.scheme:
            continue
        consumer.input_quantizers[index] = None
        consumer.set_input_source(index, source)


class QuantShiftedWindowAttentionMixin:
    """The quantized forward and protocol of ``QuantShiftedWindowAttention``, which is this
    mixin and torchvision's ``ShiftedWindowAttention`` (made by
    `make_quant_shifted_window_attention`). A container of quantized modules (``qkv``,
    ``proj``, ``qk``, ``pv``), not a `QuantModule` itself: surgery, `convert` and export
    treat its children as the layers."""

    quantized_container: ClassVar[bool] = True  # traced as a leaf: its children are wired here
    _qkv_type: ClassVar[type[QuantOutProjection]] = QuantOutProjection
    _cosine: ClassVar[bool] = False  # Swin V2: q and k normalised before qk

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
    ) -> nn.Module:
        """A quantized twin of ``module`` sharing its parameters and buffers."""
        inputs, params = QuantScheme.from_any(inputs), QuantScheme.from_any(params)
        if getattr(module, "logit_scale", None) is not None and not cls._cosine:
            raise ValueError(
                f"{type(module).__name__}: has logit_scale (cosine attention) but is not a "
                "ShiftedWindowAttentionV2, whose family computes it; allowed: V1 attention "
                "without logit_scale, or ShiftedWindowAttentionV2"
            )
        qmodule = cls.__new__(cls)
        nn.Module.__init__(qmodule)
        skip = ("_parameters", "_buffers", "_modules")
        qmodule.__dict__.update(
            {
                k: (copy.copy(v) if isinstance(v, (dict, list)) else v)
                for k, v in module.__dict__.items()
                if k not in skip
            }
        )
        qmodule._parameters = dict(module._parameters)
        qmodule._buffers = dict(module._buffers)
        qmodule._modules = dict(module._modules)
        qmodule.qkv = _projection(module.qkv, inputs, params, cls._qkv_type)
        qmodule.proj = _projection(module.proj, inputs, params)
        qmodule.qk, qmodule.pv = attention_matmuls(inputs)  # (the softmax output unsigned)
        if inputs is not None:
            _quantize_once(qmodule, queries_keys=not cls._cosine)
        qmodule.training = module.training
        return qmodule

    # -- what the report, surgery and convert ask -------------------------------------------------
    def quantizers(self) -> Iterator[Quantizer]:
        """Every quantizer of its quantized modules."""
        for module in self.modules():
            if isinstance(module, QuantModule):
                yield from module.quantizers()

    @property
    def input_quantizers(self) -> list[Quantizer | None]:
        """The quantizer of its input (``qkv``'s)."""
        return [self.qkv.input_quantizers[0]]

    @property
    def param_quantizers(self) -> dict[str, Quantizer | None]:
        """Weight quantizers by parameter name (the bias table is float: not listed)."""
        return {
            f"{name}.weight": module.param_quantizers["weight"]
            for name, module in self.named_modules()
            if isinstance(module, QuantModule) and "weight" in module.param_quantizers
        }

    @property
    def container_output(self) -> Quantizer | None:
        """The encoding of its output: ``proj``'s output, only moved (windows reversed,
        unshifted, cropped)."""
        return self.proj.output_quantizers[0]

    def input_slots(self) -> list[tuple[nn.Module, list[int | None]]]:
        """``qkv`` takes its argument 0 (padded with zeros, which every grid holds)."""
        return [(self.qkv, [0])]

    def to_float(self) -> nn.Module:
        """The float attention again (torchvision's class, or the user's subclass of it),
        with the same parameters and buffers."""
        float_type = next(
            c
            for c in type(self).__mro__
            if issubclass(c, nn.Module) and not issubclass(c, QuantShiftedWindowAttentionMixin)
        )
        module = float_type.__new__(float_type)
        module.__dict__.update(
            {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        )
        module._modules = {k: v for k, v in self._modules.items() if k not in _CHILDREN}
        module._modules["qkv"] = self.qkv.to_float()
        module._modules["proj"] = self.proj.to_float()
        mlp = module._modules.get("cpb_mlp")  # Swin V2's
        if mlp is not None:
            module._modules["cpb_mlp"] = copy.copy(mlp)
            module.cpb_mlp._modules = {
                k: m.to_float() if isinstance(m, QuantModule) else m
                for k, m in mlp._modules.items()
            }
        return module

    # -- forward -----------------------------------------------------------------------------------
    def _queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[Any, Any, Any]:
        """q and k as ``qk`` takes them, and the factor of their product: ``head_dim**-0.5``."""
        return q, k, q.shape[-1] ** -0.5

    def _position_bias(self) -> torch.Tensor:
        """The relative position bias ``(heads, N, N)``, from the learned table."""
        return relative_position_bias(
            self.relative_position_bias_table, self.relative_position_index, self.window_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention of ``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)`` (see the
        module docstring); equal to torchvision's up to float rounding with quantizers off."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        heads = self.num_heads
        x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
        ph, pw = x.shape[1], x.shape[2]
        # a window covering the padded map along a side: no shift along it
        shift = [self.shift_size[0] if wh < ph else 0, self.shift_size[1] if ww < pw else 0]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        rows, cols, n = ph // wh, pw // ww, wh * ww
        windows = x.view(b, rows, wh, cols, ww, c).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(b * rows * cols, n, c)

        qkv = self.qkv(windows).reshape(b, rows * cols, n, 3, heads, c // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, d)
        q, k, scale = self._queries_keys(q, k)
        bias = self._position_bias()
        mask = None
        if shifted:
            mask = shift_mask((ph, pw), (wh, ww), (shift[0], shift[1]), x.device, bias.dtype)
            mask = mask.unsqueeze(1)  # (nW, 1, N, N): the same for every head
        out, _ = attention_core(
            self.qk, self.pv, q, k, v, scale, (bias, mask),
            self.attention_dropout, self.training,
        )  # fmt: skip
        out = out.transpose(2, 3).reshape(b * rows * cols, n, c)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)

        out = out.view(b, rows, cols, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if shifted:
            out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
        return out[:, :h, :w, :].contiguous()


class QuantShiftedWindowAttentionV2Mixin(QuantShiftedWindowAttentionMixin):
    """Swin V2's ``ShiftedWindowAttentionV2`` (made by `make_quant_shifted_window_attention`):
    cosine attention, ``normalize(q) · normalize(k)ᵀ * exp(min(logit_scale, log 100))``, the
    k third of the ``qkv`` bias zero, and a continuous position bias
    ``16 * sigmoid(cpb_mlp(relative_coords_table))``. ``qk`` quantizes the normalised q and k
    with its own input quantizers (they are not on ``qkv``'s grid); ``logit_scale`` (one per
    head) stays a float parameter of the container.

    ``cpb_mlp`` stays float, by design: it computes from its weights and a constant table
    only (a bias generator, no activation). `convert` (and so the ONNX export) replaces it by
    the float bias it computes (``heads x N x N``, the buffer ``position_bias``); quantized,
    it would run as a float Gemm in onnxruntime at every call (its ``DequantizeLinear``
    inputs are not folded)."""

    _qkv_type: ClassVar[type[QuantOutProjection]] = QuantQKVProjectionV2
    _cosine: ClassVar[bool] = True

    def _queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[Any, Any, Any]:
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # (heads, 1, 1)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), scale

    def finish_convert(self) -> None:
        """In `convert`'s copy: the position bias computed once, kept as the buffer
        ``position_bias`` (``heads, N, N``, float), in place of ``cpb_mlp`` (its weights and
        input are fixed now: the same float computation, so integer eval and the converted
        model still agree bit for bit)."""
        with torch.no_grad():
            bias = self._position_bias()
        self.register_buffer("position_bias", bias.detach().clone())
        del self.cpb_mlp

    def _position_bias(self) -> torch.Tensor:
        if "position_bias" in self._buffers:  # converted
            return self.position_bias
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = relative_position_bias(table, self.relative_position_index, self.window_size)
        return 16 * torch.sigmoid(bias)


def make_quant_shifted_window_attention(float_type: type[nn.Module]) -> type[nn.Module]:
    """The quantized type of ``float_type`` (torchvision's ``ShiftedWindowAttention``): bases
    ``(QuantShiftedWindowAttentionMixin, float_type)``, findable by pickle as
    ``qat_lightning.nn.swin_attention.QuantShiftedWindowAttention`` in the process that made
    it."""
    v2 = float_type.__qualname__ == SWIN_V2_NAME
    name = "QuantShiftedWindowAttentionV2" if v2 else "QuantShiftedWindowAttention"
    mixin = QuantShiftedWindowAttentionV2Mixin if v2 else QuantShiftedWindowAttentionMixin
    doc = f"{float_type.__module__}.{float_type.__qualname__}, projections and matmuls quantized."
    cls = type(float_type)(name, (mixin, float_type), {"__doc__": doc})
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


register_lazy_quant_module(SWIN_MODULE, SWIN_NAME, make_quant_shifted_window_attention)
register_lazy_quant_module(SWIN_MODULE, SWIN_V2_NAME, make_quant_shifted_window_attention)
