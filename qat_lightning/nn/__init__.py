"""Quantized modules: ``forward`` is fake quantization (in eval mode without autograd, the
integer simulation), ``quantized_forward`` the integer simulation on `QTensor` codes."""

from qat_lightning.nn.activation import (
    QuantGELU,
    QuantHardsigmoid,
    QuantHardswish,
    QuantHardtanh,
    QuantLeakyReLU,
    QuantReLU,
    QuantReLU6,
    QuantSigmoid,
    QuantSiLU,
    QuantTanh,
)
from qat_lightning.nn.attention import (
    QuantInProjection,
    QuantMultiheadAttention,
    QuantOutProjection,
)
from qat_lightning.nn.base import QuantModule
from qat_lightning.nn.batchnorm import QuantBatchNorm1d, QuantBatchNorm2d, QuantBatchNorm3d
from qat_lightning.nn.conv_transpose import (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from qat_lightning.nn.elementwise import (
    Add,
    Cat,
    MatMul,
    Mul,
    QuantAdd,
    QuantCat,
    QuantMatMul,
    QuantMul,
)
from qat_lightning.nn.embedding import QuantEmbedding
from qat_lightning.nn.fused import (
    FUSED_BN_MODULES,
    QuantConvBn1d,
    QuantConvBn2d,
    QuantConvBn3d,
    QuantConvBnReLU1d,
    QuantConvBnReLU2d,
    QuantConvBnReLU3d,
    QuantLinearBn1d,
    fused_bn_type,
)
from qat_lightning.nn.hf_conv1d import QuantHFConv1DMixin
from qat_lightning.nn.integer import integer_mac, requantize
from qat_lightning.nn.integer_eval import fake_quant_eval, integer_in_eval
from qat_lightning.nn.linear import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantMAC
from qat_lightning.nn.pooling import (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAdaptiveMaxPool1d,
    QuantAdaptiveMaxPool2d,
    QuantAdaptiveMaxPool3d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMaxPool3d,
)
from qat_lightning.nn.registry import (
    QUANT_MODULES,
    quant_type_for,
    register_lazy_quant_module,
    register_quant_module,
)
from qat_lightning.nn.rnn import QuantGRU, QuantLSTM, QuantRNN
from qat_lightning.nn.sdpa import (
    QuantScaledDotProductAttention,
    ScaledDotProductAttention,
    attention_core,
)
from qat_lightning.nn.swin_attention import QuantShiftedWindowAttentionMixin

__all__ = [
    "FUSED_BN_MODULES",
    "QUANT_MODULES",
    "Add",
    "Cat",
    "MatMul",
    "Mul",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "QuantAdaptiveMaxPool1d",
    "QuantAdaptiveMaxPool2d",
    "QuantAdaptiveMaxPool3d",
    "QuantAdd",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantBatchNorm1d",
    "QuantBatchNorm2d",
    "QuantBatchNorm3d",
    "QuantCat",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvBn3d",
    "QuantConvBnReLU1d",
    "QuantConvBnReLU2d",
    "QuantConvBnReLU3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantEmbedding",
    "QuantGELU",
    "QuantGRU",
    "QuantHFConv1DMixin",
    "QuantHardsigmoid",
    "QuantHardswish",
    "QuantHardtanh",
    "QuantInProjection",
    "QuantLSTM",
    "QuantLeakyReLU",
    "QuantLinear",
    "QuantLinearBn1d",
    "QuantMAC",
    "QuantMatMul",
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMaxPool3d",
    "QuantModule",
    "QuantMul",
    "QuantMultiheadAttention",
    "QuantOutProjection",
    "QuantRNN",
    "QuantReLU",
    "QuantReLU6",
    "QuantScaledDotProductAttention",
    "QuantShiftedWindowAttentionMixin",
    "QuantSiLU",
    "QuantSigmoid",
    "QuantTanh",
    "ScaledDotProductAttention",
    "attention_core",
    "fake_quant_eval",
    "fused_bn_type",
    "integer_in_eval",
    "integer_mac",
    "quant_type_for",
    "register_lazy_quant_module",
    "register_quant_module",
    "requantize",
]
