"""Conv/Linear fused with BatchNorm (and ReLU): BN folding simulated in QAT, exact at export.

At inference a BatchNorm after a conv is folded into it, per output channel ``c``::

    s_c = gamma_c / sqrt(running_var_c + eps)
    w_f = w * s_c            b_f = (b - running_mean_c) * s_c + beta_c

so the weight the integer model really uses is ``w_f``, and that is what must be
fake-quantized during training. With live batch statistics (QAT before the BN statistics are
frozen) the fused modules simulate the fold as Krishnamoorthi 2018 (sec. 3.2.2) and
``torch.ao.nn.intrinsic.qat.ConvBn2d`` do: quantize ``w * s`` (running statistics, so the
weight grid does not jitter with each batch), convolve, divide the output by ``s``, add the
conv bias and run the BatchNorm module itself on batch statistics, which also updates its
running statistics. Once the statistics are frozen (`freeze_bn_stats`), in eval mode and in
integer mode, the module is exactly ``conv(fq(x), fq(w_f), b_f)``: what trains is what exports.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.linear import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from qat_lightning.nn.registry import overridden_methods, specialise
from qat_lightning.quant import QuantScheme

M = TypeVar("M", bound="_FusedBn")


class _DivideByChannel(torch.autograd.Function):
    """``y / d`` for a per-channel ``d``, saving the quotient for backward instead of ``y``.

    Autograd's own division saves its numerator (here the conv output, a second activation
    beside the quotient that BatchNorm saves) and in backward recomputes the quotient:
    ``grad_y = g / d``, ``grad_d = sum(-g * ((y / d) / d))`` (torch's derivatives.yaml).
    With the quotient saved the gradients are bit-identical, one full-size division and the
    full-size negation fewer (negating the reduced sum instead is exact: rounding is
    symmetric), and the tensor saved is the one BatchNorm holds anyway.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        quotient = y / d
        ctx.save_for_backward(quotient, d)
        return quotient

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        quotient, d = ctx.saved_tensors
        grad_y = grad / d if ctx.needs_input_grad[0] else None
        grad_d = None
        if ctx.needs_input_grad[1]:
            grad_d = (grad * (quotient / d)).sum_to_size(d.shape).neg()
        return grad_y, grad_d


def divide_by_channel(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y / d`` (``d`` broadcast along channels) with the gradients of autograd's division,
    bit for bit, at less cost; see `_DivideByChannel`."""
    if not (y.requires_grad or d.requires_grad) or not torch.is_grad_enabled():
        return y / d
    return _DivideByChannel.apply(y, d)


class _FusedBn:
    """The BN-folding behaviour every fused class shares.

    Mixed in before the class's quantized layer (``QuantConvBn2d(_FusedBn, QuantConv2d)``),
    so a fused module is still an ``nn.Conv2d`` / ``nn.Linear`` with that layer's parameters.
    State: the BatchNorm submodule ``bn`` and two uint8 buffers, ``bn_frozen`` (use and keep
    the running statistics even in train mode) and ``bn_folded`` (`fold_bn` was applied: the
    layer's own weight and bias are folded and ``bn`` is skipped).
    """

    _float_layer: ClassVar[type[nn.Module]]
    _float_bn: ClassVar[type[_BatchNorm]]
    _relu: ClassVar[bool] = False

    bn: _BatchNorm
    bn_frozen: torch.Tensor
    bn_folded: torch.Tensor

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_float(cls, module: nn.Module, inputs: Any, params: Any) -> QuantModule:
        raise TypeError(
            f"{cls.__name__} fuses a layer with its BatchNorm: build it with "
            f"{cls.__name__}.from_modules(layer, bn, inputs, params)"
        )

    @classmethod
    def from_modules(
        cls,
        layer: nn.Module,
        bn: _BatchNorm,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
        relu: bool = False,
    ) -> _FusedBn:
        """Fuse ``layer`` (conv or linear) with the ``bn`` that follows it (and a ReLU).

        The result shares ``layer``'s and ``bn``'s `Parameter` objects and keeps ``bn`` itself
        as submodule ``bn``, so an optimizer built on the float model trains it. ``relu=True``
        on a class without ReLU returns its ReLU twin (``QuantConvBn2d`` ->
        ``QuantConvBnReLU2d``); the ReLU classes always apply ReLU. A layer in train mode whose
        ``bn`` is in eval mode (BN frozen by the user) starts with frozen statistics.

        Example:
            >>> fused = QuantConvBn2d.from_modules(conv, bn, QuantScheme(8), weight_scheme)
        """
        target = cls
        if relu and not cls._relu:
            target = _RELU_TWINS.get(cls)
            if target is None:
                raise ValueError(
                    f"{cls.__name__}.from_modules: relu=True is not supported; allowed: "
                    f"relu=False, or one of {sorted(c.__name__ for c in _RELU_TWINS)}"
                )
        target._check_modules(layer, bn)
        qmodule = super(_FusedBn, target).from_float(layer, inputs, params)
        qmodule.bn = bn
        device = layer.weight.device
        qmodule.register_buffer("bn_frozen", torch.zeros((), dtype=torch.uint8, device=device))
        qmodule.register_buffer("bn_folded", torch.zeros((), dtype=torch.uint8, device=device))
        if qmodule.training and not bn.training:
            qmodule.freeze_bn_stats(True)
        return qmodule

    @classmethod
    def _check_modules(cls, layer: nn.Module, bn: nn.Module) -> None:
        name = f"{cls.__name__}.from_modules"
        if type(layer) is not cls._float_layer and not issubclass(cls, type(layer)):
            raise TypeError(
                f"{name}: layer must be exactly {cls._float_layer.__name__} (for a subclass, "
                f"use fused_bn_type(layer)), got {type(layer).__name__}"
            )
        if not isinstance(bn, (cls._float_bn, nn.SyncBatchNorm)):
            raise TypeError(
                f"{name}: bn must be a {cls._float_bn.__name__} (or SyncBatchNorm), "
                f"got {type(bn).__name__}"
            )
        channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if bn.num_features != channels:
            raise ValueError(
                f"{name}: bn.num_features={bn.num_features} must equal the layer's output "
                f"channels ({channels})"
            )
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{name}: bn.track_running_stats={bn.track_running_stats} is not supported; "
                "allowed: True (folding needs running statistics)"
            )

    @property
    def output_relu(self) -> bool:
        return self._relu

    # -- switches ------------------------------------------------------------------------------
    def freeze_bn_stats(self: M, freeze: bool = True) -> M:
        """Use (and stop updating) the running statistics, also in train mode.

        Frozen, the module computes exactly what the exported model computes. The state is
        the ``bn_frozen`` buffer, so it is part of checkpoints.
        """
        self.bn_frozen.fill_(int(freeze))
        if not freeze:
            self.bn.train(self.training)
        return self

    @torch.no_grad()
    def fold_bn(self: M) -> M:
        """Fold the BatchNorm into the layer's weight and bias, in place and for good.

        Afterwards the module is a plain quantized layer with the folded parameters (``bn``
        is kept but skipped), in train and eval mode alike; eval outputs and integer codes are
        unchanged. The weight keeps its `Parameter` object. A layer without a bias takes
        ``bn.bias`` (beta) as its bias, so an optimizer built earlier still trains it; with
        ``affine=False`` BN a new bias `Parameter` is made, which such an optimizer lacks.
        ``bn.weight`` takes no part any more: under DDP fold before wrapping, or use
        ``find_unused_parameters=True``.
        """
        if self.bn_folded:
            return self
        weight, bias = self._exact_fold()
        self.weight.copy_(weight)
        if self.bias is None:
            self.bias = self._new_bias(bias)
        self.bias.copy_(bias)
        self.bn_folded.fill_(1)
        return self

    def _new_bias(self, like: torch.Tensor) -> nn.Parameter:
        if self.bn.bias is not None:
            return self.bn.bias
        return nn.Parameter(torch.zeros_like(like, device=self.weight.device))

    # -- the fold ------------------------------------------------------------------------------
    @torch.compiler.disable
    def _bn_scale(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel (gamma = 1 without affine).

        Run eagerly, also inside ``torch.compile``: the BN forward of the same training step
        updates ``running_var`` in place, and a compiled graph may save the buffer itself for
        backward (recomputing this scale from it), which then fails ("modified by an inplace
        operation") or would differentiate the updated statistics. Eager autograd saves the
        scale that was used.
        """
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        return std.reciprocal() if self.bn.weight is None else self.bn.weight / std

    def _weight_view(self) -> list[int]:
        return [-1] + [1] * (self.weight.dim() - 1)

    def _output_view(self) -> list[int]:
        return [1, -1] + [1] * (self.weight.dim() - 2)

    def _exact_fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN-folded (weight, bias) from the running statistics, differentiable."""
        scale = self._bn_scale()
        weight = self.weight * scale.reshape(self._weight_view())
        mean = self.bn.running_mean
        bias = -mean if self.bias is None else self.bias - mean
        bias = bias * scale
        if self.bn.bias is not None:
            bias = bias + self.bn.bias
        return weight, bias

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exactly BN-folded (weight, bias) that integer mode and export quantize."""
        if self.bn_folded:
            return self.weight, self.bias
        return self._exact_fold()

    # -- forward -------------------------------------------------------------------------------
    def _mac(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.mac_op(self, x, weight, bias)  # the layer family's op (conv or linear)

    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fq_input(x)
        if self.bn_folded:
            y = self._mac(x, self.fq_param("weight"), self.fq_bias(self.bias))
        elif self.training and not self.bn_frozen:
            y = self._simulated_fold(x)
        else:
            weight, bias = self._exact_fold()
            y = self._mac(x, self.fq_param("weight", weight), self.fq_bias(bias))
        if self._relu:
            return self.fq_output_after_relu(y)
        return self.fq_output(y)

    def _simulated_fold(self, x: torch.Tensor) -> torch.Tensor:
        """QAT with batch statistics: quantize the weight folded with the running statistics,
        undo the scale on the output and let the BN module normalise with the batch's."""
        scale = self._bn_scale()
        weight = self.fq_param("weight", self.weight * scale.reshape(self._weight_view()))
        # gamma = 0 zeroes a channel's weight; dividing 0 by 1 keeps it finite (BN gives beta).
        divisor = scale.masked_fill(scale == 0, 1.0)
        y = divide_by_channel(self._mac(x, weight, None), divisor.reshape(self._output_view()))
        if self.bias is not None:
            y = y + self.bias.reshape(self._output_view())
        return self.bn(y)

    # -- going out -----------------------------------------------------------------------------
    def to_float(self) -> nn.Module:
        """``nn.Sequential(layer, bn[, ReLU])`` with the same parameters, or, once folded, the
        folded layer (followed by ReLU for the ReLU classes).

        With frozen statistics in train mode, ``bn`` is put in eval mode so that the float
        model keeps using (and not updating) its running statistics.
        """
        layer = super().to_float()
        layer._modules.pop("bn", None)
        for name in ("bn_frozen", "bn_folded"):
            layer._buffers.pop(name, None)
        relu = [nn.ReLU()] if self._relu else []
        if self.bn_folded:
            return nn.Sequential(layer, *relu) if relu else layer
        float_model = nn.Sequential(layer, self.bn, *relu).train(self.training)
        self.bn.train(self.training and not self.bn_frozen)
        return float_model

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A folded checkpoint of a layer that had no bias carries one; an unfolded one not.
        folded = state_dict.get(prefix + "bn_folded")
        has_bias = prefix + "bias" in state_dict
        if folded is not None and bool(folded) and self.bias is None and has_bias:
            self.bias = self._new_bias(state_dict[prefix + "bias"])
        elif folded is not None and not bool(folded) and self.bn_folded and not has_bias:
            self.bias = None  # the bias came from fold_bn
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "folded" if self.bn_folded else "frozen" if self.bn_frozen else "live"
        return f"{super().extra_repr()}, bn={state}" + (", relu" if self._relu else "")


class QuantConvBn1d(_FusedBn, QuantConv1d):
    """`nn.Conv1d` + `nn.BatchNorm1d`, BN folding simulated in QAT; see the module docstring."""

    _float_layer = nn.Conv1d
    _float_bn = nn.BatchNorm1d


class QuantConvBn2d(_FusedBn, QuantConv2d):
    """`nn.Conv2d` + `nn.BatchNorm2d`, BN folding simulated in QAT; see the module docstring."""

    _float_layer = nn.Conv2d
    _float_bn = nn.BatchNorm2d


class QuantConvBn3d(_FusedBn, QuantConv3d):
    """`nn.Conv3d` + `nn.BatchNorm3d`, BN folding simulated in QAT; see the module docstring."""

    _float_layer = nn.Conv3d
    _float_bn = nn.BatchNorm3d


class QuantConvBnReLU1d(QuantConvBn1d):
    """`QuantConvBn1d` followed by ReLU (before the output quantizer)."""

    _relu = True


class QuantConvBnReLU2d(QuantConvBn2d):
    """`QuantConvBn2d` followed by ReLU (before the output quantizer)."""

    _relu = True


class QuantConvBnReLU3d(QuantConvBn3d):
    """`QuantConvBn3d` followed by ReLU (before the output quantizer)."""

    _relu = True


class QuantLinearBn1d(_FusedBn, QuantLinear):
    """`nn.Linear` + `nn.BatchNorm1d` on ``(N, C)`` inputs; see the module docstring."""

    _float_layer = nn.Linear
    _float_bn = nn.BatchNorm1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"QuantLinearBn1d: input must be 2-D (N, {self.in_features}) as BatchNorm1d "
                f"normalises dim 1, got shape {tuple(x.shape)}"
            )
        return super().forward(x)


_RELU_TWINS: dict[type, type] = {
    QuantConvBn1d: QuantConvBnReLU1d,
    QuantConvBn2d: QuantConvBnReLU2d,
    QuantConvBn3d: QuantConvBnReLU3d,
}

# (float layer type, with ReLU) -> fused class, for model surgery.
FUSED_BN_MODULES: dict[tuple[type[nn.Module], bool], type[_FusedBn]] = {
    (nn.Conv1d, False): QuantConvBn1d,
    (nn.Conv2d, False): QuantConvBn2d,
    (nn.Conv3d, False): QuantConvBn3d,
    (nn.Conv1d, True): QuantConvBnReLU1d,
    (nn.Conv2d, True): QuantConvBnReLU2d,
    (nn.Conv3d, True): QuantConvBnReLU3d,
    (nn.Linear, False): QuantLinearBn1d,
}


def fused_bn_type(layer: nn.Module, relu: bool = False) -> type[_FusedBn] | None:
    """The fused class for ``layer`` followed by BatchNorm (and ReLU), or None if there is none.

    Looked up like the registry: the exact type first, else the nearest base class in the MRO
    with a fused form, specialised to ``layer``'s type (still an instance of it), unless the
    subclass overrides that base's methods.

    Example:
        >>> fused_bn_type(nn.Conv2d(3, 8, 3), relu=True)
        <class 'qat_lightning.nn.fused.QuantConvBnReLU2d'>
    """
    layer_type = type(layer)
    exact = FUSED_BN_MODULES.get((layer_type, relu))
    if exact is not None or isinstance(layer, QuantModule):
        return exact
    base = next((b for b in layer_type.__mro__ if (b, relu) in FUSED_BN_MODULES), None)
    if base is None or overridden_methods(layer_type, base):
        return None
    return specialise(FUSED_BN_MODULES[(base, relu)], layer_type)
