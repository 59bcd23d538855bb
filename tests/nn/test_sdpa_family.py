"""`QuantScaledDotProductAttention` is ``F.scaled_dot_product_attention`` with its two matmuls
quantized: the float function itself with every quantizer off, the same masks / causal /
scale / GQA semantics in its quantized form, integer eval equal to `convert` bit for bit, and
a train step reaches q, k and v (surgery and export: tests/export/test_sdpa_export.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import convert
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.nn import (
    QuantScaledDotProductAttention,
    fake_quant_eval,
)
from qat_lightning.quant import Quantizer

U8 = {"bits": 8, "symmetric": False, "signed": False}


def _arguments(seed: int, mask: str, gqa: bool, scale: bool, blocked_row: bool):
    torch.manual_seed(seed)
    n, heads, tgt, src, d = 2, 4, 5, 7, 8
    kv_heads = 2 if gqa else heads
    q = torch.randn(n, heads, tgt, d)
    k, v = torch.randn(n, kv_heads, src, d), torch.randn(n, kv_heads, src, d)
    kwargs: dict = {"enable_gqa": gqa}
    if scale:
        kwargs["scale"] = 0.37
    attend = torch.rand(n, 1, tgt, src) > 0.4
    attend[..., 0] = True
    if blocked_row:
        attend[0, 0, 1] = False  # query 1 of sequence 0 attends nowhere: zeros, not NaN
    if mask == "bool":
        kwargs["attn_mask"] = attend
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(tgt, src).masked_fill(~attend[1, 0], -float("inf"))
    elif mask == "causal":
        kwargs["is_causal"] = True
    return (q, k, v), kwargs


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    mask=st.sampled_from(["none", "bool", "float", "causal"]),
    gqa=st.booleans(),
    scale=st.booleans(),
    blocked_row=st.booleans(),
)
def test_its_float_forms_are_the_function(seed, mask, gqa, scale, blocked_row) -> None:
    args, kwargs = _arguments(seed, mask, gqa, scale, blocked_row)
    expected = F.scaled_dot_product_attention(*args, **kwargs)
    attention = QuantScaledDotProductAttention(U8).eval()
    for quantizer in attention.modules():
        if isinstance(quantizer, Quantizer):
            quantizer.enable_fake_quant(False).enable_observer(False)
    assert torch.equal(attention(*args, **kwargs), expected)  # every quantizer off: the function
    # Observing (calibration: no fake quant) it runs its own decomposed form: same semantics.
    with attention.qk.compute_encodings(), attention.pv.compute_encodings():
        decomposed = attention(*args, **kwargs)
    assert not decomposed.isnan().any()
    torch.testing.assert_close(decomposed, expected, rtol=1e-5, atol=1e-5)


def test_attn_mask_and_is_causal_together_are_refused_as_by_torch() -> None:
    (q, k, v), _ = _arguments(0, "none", False, False, False)
    attention = QuantScaledDotProductAttention(U8)
    with (
        pytest.raises(ValueError, match="attn_mask and is_causal=True were both given"),
        attention.qk.compute_encodings(),
    ):
        attention(q, k, v, torch.ones(5, 7, dtype=torch.bool), is_causal=True)


def _calibrated(attention: QuantScaledDotProductAttention, kwargs: dict):
    batches = [_arguments(s, "bool", False, False, False)[0] for s in range(4)]
    with torch.no_grad(), attention.qk.compute_encodings(), attention.pv.compute_encodings():
        for batch in batches:
            attention(*batch, **kwargs)
    return attention.eval()


@pytest.mark.parametrize("mask", ["bool", "causal"])
def test_integer_eval_is_convert_bit_for_bit_and_near_float(mask) -> None:
    model = nn.Sequential()  # convert replaces children: give the attention a parent
    model.add_module("attention", QuantScaledDotProductAttention(U8))
    (q, k, v), kwargs = _arguments(7, mask, False, False, False)
    _calibrated(model.attention, kwargs)
    for quantizer in model.attention.quantizers():
        assert bool(quantizer.initialized)
    assert model.attention.pv.input_quantizers[0].scheme.signed is False  # probabilities
    calls = []
    hook = model.attention.qk.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        integer = model.attention(q, k, v, **kwargs)
        with fake_quant_eval():
            simulated = model.attention(q, k, v, **kwargs)
        assert model.attention.qk.runs_integer((q, k))  # eval: the integer simulation
    hook.remove()
    assert calls
    converted = convert(model)
    assert isinstance(converted.attention.qk, QuantizedOp)
    assert isinstance(converted.attention.pv, QuantizedOp)
    with torch.no_grad():
        assert torch.equal(converted.attention(q, k, v, **kwargs), integer)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert (integer - expected).norm() < 0.05 * expected.norm()
    assert (integer - simulated).abs().max() < 0.05


def test_a_train_step_reaches_q_k_and_v_through_the_quantizers() -> None:
    attention = QuantScaledDotProductAttention(U8)
    (q, k, v), kwargs = _arguments(3, "float", False, True, False)
    _calibrated(attention, kwargs).train()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    attention(q, k, v, **kwargs).square().sum().backward()
    for name, t in zip("qkv", (q, k, v), strict=True):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
