"""What each family promises beyond the common protocol: encodings passed through, options
honoured, clear errors for what integer mode cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat_lightning import nn as qnn
from qat_lightning.quant import QTensor, QuantScheme

ACT = QuantScheme(bits=8, symmetric=False, signed=False)
W = QuantScheme(bits=8, granularity="per_channel")


def calibrated(module, *inputs):
    with torch.no_grad(), module.compute_encodings():
        module(*inputs)
    return module.eval()


# -- max pools keep the producer's grid ------------------------------------------------------
def test_max_pool_passes_the_input_encoding_through() -> None:
    q = calibrated(
        qnn.QuantMaxPool2d.from_float(nn.MaxPool2d(2), ACT, None), torch.randn(2, 3, 4, 4)
    )
    assert list(q.output_quantizers) == [None]
    x = torch.randn(2, 3, 4, 4)
    out = q.quantized_forward(q.input_quantizers[0].quantize(x))
    assert torch.equal(out.scale, q.input_quantizers[0].scale)
    # With the input quantized by its producer, the producer's encoding (any width) comes out.
    q.input_quantizers[0] = None
    producer = QTensor(
        torch.randint(-8, 8, (2, 3, 4, 4), dtype=torch.int8),
        torch.tensor(0.37),
        torch.tensor(0, dtype=torch.int32),
        QuantScheme(bits=4),
    )
    out = q.quantized_forward(producer)
    assert out.scheme == producer.scheme and torch.equal(out.scale, producer.scale)
    assert torch.equal(
        out.codes, nn.functional.max_pool2d(producer.codes.float(), 2).to(torch.int8)
    )


def test_max_pool_return_indices_trains_but_has_no_integer_mode() -> None:
    q = qnn.QuantMaxPool1d.from_float(nn.MaxPool1d(2, return_indices=True), ACT, None)
    x = torch.randn(2, 3, 8)
    _, indices = calibrated(q, x)(x)
    assert torch.equal(indices, nn.functional.max_pool1d(x, 2, return_indices=True)[1])
    with pytest.raises(ValueError, match="return_indices"):
        q.quantized_forward(q.input_quantizers[0].quantize(x))


def test_avg_pool_without_output_quantizer_is_a_clear_error() -> None:
    q = calibrated(qnn.QuantAvgPool1d.from_float(nn.AvgPool1d(2), ACT, None), torch.randn(2, 8))
    q.output_quantizers[0] = None
    with pytest.raises(ValueError, match="output quantizer"):
        q.quantized_forward(q.input_quantizers[0].quantize(torch.randn(2, 8)))


# -- activations never compute in place ------------------------------------------------------
@pytest.mark.parametrize("float_type", [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU])
@pytest.mark.parametrize("input_quantized_by_producer", [False, True])
def test_inplace_activation_leaves_its_input_alone(float_type, input_quantized_by_producer) -> None:
    q = qnn.QUANT_MODULES[float_type].from_float(float_type(inplace=True), ACT, None)
    if input_quantized_by_producer:
        q.input_quantizers[0] = None
    x = torch.randn(64) * 4
    snapshot = x.clone()
    calibrated(q, x)  # observers on, fake quant off: the input itself reaches the function
    assert torch.equal(x, snapshot)
    q.train()
    y = q(x)
    assert torch.equal(x, snapshot)
    reference = float_type(inplace=False)(x)
    # half an LSB at the output, and at the input times the slope (<= 1.5 for these)
    tolerance = q.output_quantizers[0].scale / 2
    if q.input_quantizers[0] is not None:
        tolerance = tolerance + 0.75 * q.input_quantizers[0].scale
    assert (y - reference).abs().max() <= tolerance * 1.001


# -- elementwise ----------------------------------------------------------------------------
def test_elementwise_build_from_a_scheme_dict() -> None:
    add = qnn.QuantAdd.create({"bits": 8, "symmetric": False, "signed": False})
    assert isinstance(add, qnn.Add)
    assert len(add.input_quantizers) == 2 and add.output_quantizers[0] is not None
    assert add.input_quantizers[0].scheme == ACT
    plain = qnn.QuantMul(None)  # no scheme: nothing is quantized, the op is exact
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(plain(a, b), a * b)


def test_cat_has_one_input_quantizer_per_tensor() -> None:
    cat = qnn.QuantCat.create(ACT, dim=1, num_inputs=3)
    assert len(cat.input_quantizers) == 3
    xs = [torch.randn(2, 1, 4), torch.randn(2, 2, 4) * 10, torch.randn(2, 3, 4)]
    calibrated(cat, xs)
    assert cat(xs).shape == (2, 6, 4)
    scales = [q.scale.item() for q in cat.input_quantizers]
    assert scales[1] > 5 * scales[0]  # each input observed on its own
    with pytest.raises(ValueError, match="num_inputs=3"):
        cat(xs[:2])
    swapped = qnn.QuantCat.from_float(qnn.Cat(dim=-1, num_inputs=4), ACT, None)
    assert len(swapped.input_quantizers) == 4 and swapped.dim == -1
    back = swapped.to_float()
    assert type(back) is qnn.Cat and back.num_inputs == 4


def test_product_integer_mode_needs_per_tensor_inputs() -> None:
    mul = qnn.QuantMul(ACT)
    mul.input_quantizers[0] = None
    per_channel = QTensor(
        torch.zeros(2, 3, dtype=torch.int8),
        torch.ones(3),
        torch.zeros(3, dtype=torch.int32),
        QuantScheme(granularity="per_channel", axis=1),
    )
    calibrated(mul, torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="per-tensor"):
        mul.quantized_forward(per_channel, mul.input_quantizers[1].quantize(torch.randn(2, 3)))


# -- embedding --------------------------------------------------------------------------------
def test_embedding_quantizes_rows_not_indices() -> None:
    q = qnn.QuantEmbedding.from_float(nn.Embedding(20, 8, padding_idx=0), ACT, W)
    assert list(q.input_quantizers) == [None]
    idx = torch.randint(0, 20, (4, 5))
    calibrated(q, idx)
    assert q.param_quantizers["weight"].scale.shape == (20,)  # one scale per row (axis 0)
    out = q.quantized_forward(idx)
    assert out.codes.shape == (4, 5, 8)
    with pytest.raises(TypeError, match="integer tensor"):
        q.quantized_forward(idx.float())


def test_embedding_padding_row_gets_no_gradient() -> None:
    q = calibrated(
        qnn.QuantEmbedding.from_float(nn.Embedding(10, 4, padding_idx=2), ACT, W),
        torch.arange(10),
    ).train()
    q(torch.tensor([[2, 3, 2, 5]])).pow(2).sum().backward()
    assert q.weight.grad[2].abs().sum() == 0 and q.weight.grad[3].abs().sum() > 0


def test_embedding_max_norm_renormalizes_the_float_table_as_torch_does() -> None:
    torch.manual_seed(0)
    float_module = nn.Embedding(10, 4, max_norm=1.0)
    float_module.weight.data.mul_(3)
    reference = copy.deepcopy(float_module)
    q = qnn.QuantEmbedding.from_float(float_module, ACT, W)
    idx = torch.tensor([[1, 4, 7]])
    calibrated(q, torch.arange(10))
    reference(torch.arange(10))
    torch.testing.assert_close(q.weight, reference.weight)
    assert q.weight.norm(dim=1).max() <= 1.0 + 1e-6
    out = q.quantized_forward(idx).dequantize()
    step = q.output_quantizers[0].scale + q.param_quantizers["weight"].scale.max()
    assert (out - reference(idx)).abs().max() <= step


def test_embedding_sparse_is_rejected() -> None:
    with pytest.raises(ValueError, match="sparse"):
        qnn.QuantEmbedding.from_float(nn.Embedding(10, 4, sparse=True), ACT, W)


# -- transposed convolutions ------------------------------------------------------------------
def test_conv_transpose_groups_share_each_weight_scale_across_groups() -> None:
    """Weight slice j (axis 1) serves output channel j of every group: the integer accumulator
    uses that slice's scale for each of those channels."""
    conv = nn.ConvTranspose1d(4, 6, 3, groups=2, bias=True)
    q = qnn.QuantConvTranspose1d.from_float(conv, ACT, W)
    with torch.no_grad():
        q.weight[:, 0] *= 20  # channel 0 of each group gets a much larger scale
    x = torch.randn(8, 4, 6)
    calibrated(q, x)
    scale = q.param_quantizers["weight"].scale
    assert scale.shape == (3,) and scale[0] > 5 * scale[1]
    with torch.no_grad():
        expected = q.output_quantizers[0].quantize(q(x)).codes
    got = q.quantized_forward(q.input_quantizers[0].quantize(x))
    assert (expected.long() - got.codes.long()).abs().max() <= 1
