"""Shared cases of the fused Conv/Linear + BatchNorm (+ReLU) tests: float layer and BN pairs
with non-trivial statistics, the fused module, and calibration."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qat_lightning.nn import (
    QuantConvBn1d,
    QuantConvBn2d,
    QuantConvBn3d,
    QuantConvBnReLU1d,
    QuantConvBnReLU2d,
    QuantConvBnReLU3d,
    QuantLinearBn1d,
)
from qat_lightning.quant import QuantScheme

ACT = QuantScheme(bits=8, symmetric=False)
WEIGHT = QuantScheme(bits=8, granularity="per_channel")


def _conv(conv_type, channels_in, channels_out):
    return lambda bias: conv_type(channels_in, channels_out, 3, padding=1, bias=bias)


_1D = (_conv(nn.Conv1d, 3, 6), nn.BatchNorm1d, (3, 10))
_2D = (_conv(nn.Conv2d, 3, 6), nn.BatchNorm2d, (3, 6, 6))
_3D = (_conv(nn.Conv3d, 2, 4), nn.BatchNorm3d, (2, 4, 4, 4))
# class -> (layer factory taking `bias`, bn type, input shape without batch)
CASES = {
    QuantConvBn1d: _1D,
    QuantConvBnReLU1d: _1D,
    QuantConvBn2d: _2D,
    QuantConvBnReLU2d: _2D,
    QuantConvBn3d: _3D,
    QuantConvBnReLU3d: _3D,
    QuantLinearBn1d: (lambda bias: nn.Linear(12, 10, bias=bias), nn.BatchNorm1d, (12,)),
}
ALL = list(CASES)


def float_pair(cls, bias=True, seed=0, **bn_kwargs):
    """A float layer and a BatchNorm with non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    make_layer, make_bn, shape = CASES[cls]
    layer = make_layer(bias)
    bn = make_bn(layer.weight.shape[0], **bn_kwargs)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return layer, bn, shape


def fused(cls, bias=True, seed=0, params=WEIGHT, **bn_kwargs):
    layer, bn, shape = float_pair(cls, bias, seed, **bn_kwargs)
    return cls.from_modules(layer, bn, ACT, params), shape


def float_reference(module) -> nn.Sequential:
    """An independent float copy of the fused module's layer, BN and ReLU."""
    layer = copy.deepcopy(module.to_float())
    return layer if isinstance(layer, nn.Sequential) else nn.Sequential(layer)


def calibrate(module, shape, seed=1, batches=2):
    torch.manual_seed(seed)
    module.train()
    for _ in range(batches):  # move the running statistics away from their initial values
        module(torch.randn(32, *shape))
    module.eval()
    with module.compute_encodings():
        module(torch.randn(64, *shape))


def disable_fake_quant(module):
    for quantizer in module.quantizers():
        quantizer.enable_fake_quant(False).enable_observer(False)


def pool(y: torch.Tensor) -> torch.Tensor:
    """Per-class scores: global average pooling over any spatial dims."""
    return y.flatten(2).mean(-1) if y.dim() > 2 else y
