"""BatchNorm that does not fold into a preceding layer, quantized as a per-channel affine.

A BatchNorm that surgery cannot fold (it follows a concat, an add or the model input, as in
DenseNet's pre-activation ``BN -> ReLU -> Conv``) is, with its running statistics, per channel
``c``::

    y = x * a_c + b_c        a_c = gamma_c / sqrt(running_var_c + eps)
                             b_c = beta_c - running_mean_c * a_c

which is a depthwise 1x1 convolution: a `QuantMAC` family whose weight is ``a`` (one value per
channel, quantized per channel: with a symmetric per-channel scheme exactly ``+-qmax`` times
its scale) and whose bias is ``b``, int32 at ``s_in * s_a``. Integer eval and `convert` run the
one integer MAC (`integer_mac`), so they agree bit for bit; the ONNX form is a depthwise 1x1
``Conv`` between QDQ pairs, which onnxruntime fuses into ``QLinearConv``.

In train mode (and wherever BatchNorm uses batch statistics) the module is the BatchNorm
itself on its fake-quantized input, with its output fake-quantized: batch statistics, running
statistics updated, ``momentum=None`` and all. The weight quantizer meanwhile observes ``a``
from the running statistics, the weight eval and export use. BatchNorms that fold into a
preceding Conv/Linear are fused before this family is asked (`qat_lightning.nn.fused`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.integer_eval import integer_in_eval
from qat_lightning.nn.linear import QuantMAC
from qat_lightning.nn.registry import register_quant_module
from qat_lightning.quant import Quantizer, QuantScheme

_DEPTHWISE_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class _QuantBatchNorm(QuantMAC):
    """The shared behaviour of QuantBatchNorm1d/2d/3d (see the module docstring)."""

    mac_output_axis: ClassVar[int] = 1
    mac_float32_exact: ClassVar[bool] = True  # one product per output: exact in float32
    _spatial_dims: ClassVar[int]

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        inputs: QuantScheme | dict[str, Any] | None,
        params: QuantScheme | dict[str, Any] | None,
    ) -> QuantModule:
        """A quantized twin of the BatchNorm ``module`` sharing its parameters and buffers.

        Raises:
            ValueError: ``module`` has no running statistics (``track_running_stats=False``
                normalises with batch statistics in eval too: no fixed affine exists).
        """
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(
                f"{type(module).__name__}(track_running_stats={module.track_running_stats}) "
                "is not supported; allowed: True (the integer affine needs running statistics)"
            )
        return super().from_float(module, inputs, params)

    def _init_quantizers(
        self,
        inputs: QuantScheme | None,
        params: QuantScheme | None,
        outputs: QuantScheme | None = None,
    ) -> None:
        """As every layer's; ``a`` gets a weight quantizer also with ``affine=False``, and none
        without activation quantization (``inputs=None``: a weight-only affine saves nothing
        over the exact float BatchNorm, which then stays float)."""
        if inputs is None:
            params = None
        super()._init_quantizers(inputs, params, outputs)
        if "weight" not in self.param_quantizers:  # affine=False: ``a`` is still a weight
            channels = self.num_features if params is not None and params.per_channel else None
            scheme = None if params is None else params
            if scheme is not None and scheme.per_channel:
                scheme = scheme.replace(axis=0)
            quantizer = Quantizer(scheme, num_channels=channels) if scheme is not None else None
            if quantizer is not None:
                quantizer.to(self.running_mean.device)
            self.param_quantizers["weight"] = quantizer

    # -- the affine -------------------------------------------------------------------------
    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None or self.running_var is None

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a`` as a depthwise 1x1 kernel ``(C, 1, 1...)`` and ``b`` ``(C,)``, from the
        running statistics (differentiable in gamma and beta)."""
        a = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            a = self.weight * a
        b = -self.running_mean * a
        if self.bias is not None:
            b = b + self.bias
        return a.reshape(-1, *[1] * (self._spatial_dims + 1)), b

    @staticmethod
    def mac_op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b, *extra: Any):
        """``x * a + b`` per channel, as a depthwise 1x1 convolution (its ONNX form too)."""
        conv = _DEPTHWISE_CONV[w.dim()]
        if x.dim() == w.dim() - 1:  # BatchNorm1d on (N, C)
            return conv(x.unsqueeze(-1), w, b, groups=w.shape[0]).squeeze(-1)
        return conv(x, w, b, groups=w.shape[0])

    # -- forward ----------------------------------------------------------------------------
    @integer_in_eval
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._uses_batch_stats():
            return self.mac_forward(x)
        y = _BatchNorm.forward(self, self.fq_input(x))
        if self.training and self.running_var is not None:
            with torch.no_grad():  # follow the weight eval and export quantize
                self.fq_param("weight", self.weight_and_bias()[0])
        return self.fq_output(y)


@register_quant_module(nn.BatchNorm1d)
class QuantBatchNorm1d(_QuantBatchNorm, nn.BatchNorm1d):
    """`nn.BatchNorm1d` (on ``(N, C)`` or ``(N, C, L)``) with fake-quantized input and output;
    in eval a per-channel integer affine."""

    _spatial_dims: ClassVar[int] = 1


@register_quant_module(nn.BatchNorm2d)
class QuantBatchNorm2d(_QuantBatchNorm, nn.BatchNorm2d):
    """`nn.BatchNorm2d` with fake-quantized input and output; in eval a per-channel integer
    affine (a depthwise 1x1 convolution)."""

    _spatial_dims: ClassVar[int] = 2


@register_quant_module(nn.BatchNorm3d)
class QuantBatchNorm3d(_QuantBatchNorm, nn.BatchNorm3d):
    """`nn.BatchNorm3d` with fake-quantized input and output; in eval a per-channel integer
    affine."""

    _spatial_dims: ClassVar[int] = 3
