"""Self-attention fake-quantizes its one input once for q, k and v where their input encodings
agree: the same output, gradients and quantizer state, bit for bit, as quantizing it three
times."""

from __future__ import annotations

import copy
from contextlib import ExitStack

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.nn import QuantMultiheadAttention
from qat_lightning.nn.attention import shared_self_attention_input
from qat_lightning.quant import QuantScheme


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not a.is_floating_point():
        return torch.equal(a, b)
    return a.shape == b.shape and torch.equal(_bits(a.float()), _bits(b.float()))


def _calibrate(attn: QuantMultiheadAttention, x: torch.Tensor) -> None:
    with torch.no_grad(), ExitStack() as stack:
        for quantizer in attn.quantizers():
            stack.enter_context(quantizer.compute_encodings())
        attn(x, x, x)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch_first=st.booleans(),
    bias=st.booleans(),
    bits=st.sampled_from([4, 8]),
    observer=st.sampled_from(["minmax", "moving_minmax"]),
    per_channel_weights=st.booleans(),
    diverge=st.booleans(),
)
def test_one_fake_quant_for_q_k_v_equals_three(
    seed, batch_first, bias, bits, observer, per_channel_weights, diverge
) -> None:
    torch.manual_seed(seed)
    e, heads, n, length = 16, 4, 3, 5
    inputs = QuantScheme(bits=bits, symmetric=False, signed=False, observer=observer)
    params = QuantScheme(
        bits=bits, granularity="per_channel" if per_channel_weights else "per_tensor"
    )
    attn = QuantMultiheadAttention.from_float(
        nn.MultiheadAttention(e, heads, bias=bias, batch_first=batch_first), inputs, params
    )
    shape = (n, length, e) if batch_first else (length, n, e)
    _calibrate(attn, torch.randn(shape))
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if diverge:  # k's input encoding differs from q's: k is quantized on its own grid
        k_in = attn.k_proj.input_quantizers[0]
        k_in.enable_observer(False)
        with torch.no_grad():
            k_in.scale.mul_(1.5)
    plain = copy.deepcopy(attn.train())
    plain.q_proj.input_quantizers[0].register_forward_hook(lambda *args: None)
    attn.train()
    for step in range(3):
        x = torch.randn(shape) * (3.0 if step == 2 else 1.0)  # step 2 clips
        if step == 2:
            for m in (attn, plain):
                for p in (m.q_proj, m.k_proj, m.v_proj):
                    p.input_quantizers[0].enable_observer(False)
        upstream = torch.randn(shape)
        outs, grads = [], []
        for m in (attn, plain):
            for p in m.parameters():
                p.grad = None
            xi = x.clone().requires_grad_()
            if m is attn:
                assert shared_self_attention_input(projections, xi.detach()) is not None
                m.load_state_dict(plain.state_dict())  # (the probe call above observed once)
            out, _ = m(xi, xi, xi)
            out.backward(upstream)
            outs.append(out)
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        assert _same(outs[0], outs[1])
        # The input's gradient is summed over q, k and v before the one clip mask, not after
        # each: equal values (a clipped element's zero may differ in sign), other tensors bits.
        assert torch.equal(grads[0][0], grads[1][0])
        assert all(_same(a, b) for a, b in zip(grads[0][1:], grads[1][1:], strict=True))
        for (k, a), (_, b) in zip(
            attn.state_dict().items(), plain.state_dict().items(), strict=True
        ):
            assert _same(a, b), k


def test_cross_attention_and_learnable_scales_quantize_each_input() -> None:
    e = 8
    lsq = QuantScheme(bits=8, learnable=True)
    attn = QuantMultiheadAttention.from_float(
        nn.MultiheadAttention(e, 2, batch_first=True), lsq, QuantScheme(bits=8)
    )
    x = torch.randn(2, 3, e)
    assert shared_self_attention_input((attn.q_proj, attn.k_proj, attn.v_proj), x) is None
