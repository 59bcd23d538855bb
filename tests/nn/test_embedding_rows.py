"""QuantEmbedding fake-quantizes only the looked-up rows where that is exact: the same
output, weight gradient and quantizer state, bit for bit, as quantizing the whole table."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import nn as qnn
from qat_lightning.export.qdq import FrozenQuantizer
from qat_lightning.nn.embedding_rows import rows_suffice
from qat_lightning.quant import QuantScheme

ACT = QuantScheme(bits=8, symmetric=False, signed=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0.0 and 0.0, or two NaNs, are told apart)."""
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not a.is_floating_point():
        return torch.equal(a, b)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _full_path(q: qnn.QuantEmbedding) -> qnn.QuantEmbedding:
    """A copy that quantizes the whole table (a quantizer with a hook takes that path)."""
    full = copy.deepcopy(q)
    full.param_quantizers["weight"].register_forward_hook(lambda *args: None)
    assert not rows_suffice(full.param_quantizers["weight"])
    return full


schemes = st.builds(
    dict,
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    narrow_range=st.booleans(),
    granularity=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    observer=st.sampled_from(["minmax", "moving_minmax"]),
)


@settings(max_examples=40, deadline=None)
@given(
    scheme=schemes,
    num=st.integers(2, 40),
    groups=st.sampled_from([1, 2, 4]),
    group_size=st.sampled_from([2, 4]),
    shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
    padding=st.booleans(),
    by_freq=st.booleans(),
    output=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_looked_up_rows_equal_the_full_table_bit_for_bit(
    scheme, num, groups, group_size, shape, padding, by_freq, output, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = QuantScheme(
        group_size=group_size if scheme["granularity"] == "per_group" else None, **scheme
    )
    dim = groups * group_size
    float_module = nn.Embedding(
        num, dim, padding_idx=0 if padding else None, scale_grad_by_freq=by_freq
    )
    float_module.weight.data = torch.randn(num, dim, generator=gen)
    q = qnn.QuantEmbedding.from_float(float_module, ACT if output else None, params)
    assert rows_suffice(q.param_quantizers["weight"])
    with torch.no_grad(), q.compute_encodings():
        q(torch.arange(num))
    full = _full_path(q.train())
    for step in range(3):
        indices = torch.randint(0, min(num, 6), shape, generator=gen)  # repeated rows
        upstream = torch.randn(*shape, dim, generator=gen)
        if step == 2:  # the table moved past its encoding: rows clip, the mask matters
            for m in (q, full):
                m.param_quantizers["weight"].enable_observer(False)
                with torch.no_grad():
                    m.weight.mul_(1.7)
        outs = []
        for m in (q, full):
            m.weight.grad = None
            y = m(indices)
            y.backward(upstream)
            outs.append(y)
        assert _same_bits(outs[0], outs[1])
        assert _same_bits(q.weight.grad, full.weight.grad)
        for (k, a), (_, b) in zip(q.state_dict().items(), full.state_dict().items(), strict=True):
            assert _same_bits(a, b), k


def test_learnable_scales_and_hooks_take_the_full_table() -> None:
    lsq = QuantScheme(bits=4, granularity="per_channel", learnable=True)
    q = qnn.QuantEmbedding.from_float(nn.Embedding(12, 4), None, lsq)
    quantizer = q.param_quantizers["weight"]
    assert not rows_suffice(quantizer)  # LSQ sums its scale gradient over the whole table
    with torch.no_grad(), q.compute_encodings():
        q(torch.arange(12))
    q.train()(torch.tensor([[1, 2, 2]])).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad[[1, 2]].abs().sum() > 0
    plain = qnn.QuantEmbedding.from_float(nn.Embedding(12, 4), None, lsq.replace(learnable=False))
    seen = []
    plain.param_quantizers["weight"].register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    plain(torch.tensor([3]))
    assert seen == [(12, 4)]  # a hook (health probe, sensitivity) sees the table, as before
    frozen = FrozenQuantizer.from_quantizer(plain.param_quantizers["weight"])
    assert not rows_suffice(frozen)  # its own forward (QDQ under ONNX export) is called


def test_looked_up_rows_skip_the_table_wide_fake_quant() -> None:
    q = qnn.QuantEmbedding.from_float(
        nn.Embedding(1000, 16), None, QuantScheme(bits=8, granularity="per_channel")
    )
    with torch.no_grad(), q.compute_encodings():
        q(torch.arange(1000))
    with torch.profiler.profile(record_shapes=True) as prof:
        q.train()(torch.tensor([[1, 2, 3]])).sum().backward()
    shapes = [
        e.input_shapes
        for e in prof.events()
        if e.name == "aten::fake_quantize_per_channel_affine_cachemask"
    ]
    assert [s[0] for s in shapes] == [[3, 16]]  # the 3 rows looked up, not the 1000 x 16
