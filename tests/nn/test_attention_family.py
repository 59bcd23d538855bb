"""`QuantMultiheadAttention` computes what `nn.MultiheadAttention` computes (quantizers off),
is refused for options it does not cover, trains every weight, and gives the float module back."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import quantize_model
from qat_lightning.nn import QuantMultiheadAttention
from qat_lightning.quant import Quantizer


class Wrap(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, **kwargs):
        return self.attn(q, k, v, **kwargs)


def _quantized_off(attn: nn.MultiheadAttention) -> Wrap:
    model = Wrap(copy.deepcopy(attn))
    quantize_model(model)
    assert isinstance(model.attn, QuantMultiheadAttention)
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.enable_fake_quant(False)
    return model


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch_first=st.booleans(),
    separate_kv=st.booleans(),
    bias=st.booleans(),
    mask=st.sampled_from(["none", "bool", "float", "per_head", "padding", "both"]),
    average=st.booleans(),
    unbatched=st.booleans(),
)
def test_with_quantizers_off_it_is_multihead_attention(
    seed, batch_first, separate_kv, bias, mask, average, unbatched
) -> None:
    torch.manual_seed(seed)
    e, heads, n, tgt, src = 16, 4, 3, 5, 7
    kdim, vdim = (8, 12) if separate_kv else (e, e)
    attn = nn.MultiheadAttention(e, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    model = _quantized_off(attn)

    def shape(length, dim):
        if unbatched:
            return (length, dim)
        return (n, length, dim) if batch_first else (length, n, dim)

    q, k, v = (
        torch.randn(shape(tgt, e)),
        torch.randn(shape(src, kdim)),
        torch.randn(shape(src, vdim)),
    )
    kwargs = {"average_attn_weights": average}
    blocked = torch.rand(tgt, src) > 0.6
    blocked[:, 0] = False  # every query attends somewhere
    if mask in ("bool", "both"):
        kwargs["attn_mask"] = blocked
    if mask == "float":
        kwargs["attn_mask"] = torch.randn(tgt, src)
    if mask == "per_head" and not unbatched:
        kwargs["attn_mask"] = torch.randn(n * heads, tgt, src)
    if mask in ("padding", "both"):
        padding = torch.rand(src) > 0.6 if unbatched else torch.rand(n, src) > 0.6
        padding[..., 0] = False
        kwargs["key_padding_mask"] = padding
    expected, expected_w = attn(q, k, v, **kwargs)
    out, weights = model(q, k, v, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-4)
    out, weights = model(q, k, v, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_is_causal_is_a_hint_that_needs_the_mask_as_in_torch() -> None:
    model = _quantized_off(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        model(x, x, x, is_causal=True)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    out, _ = model(x, x, x, attn_mask=causal, is_causal=True)
    torch.testing.assert_close(out, model(x, x, x, attn_mask=causal)[0])


@pytest.mark.parametrize("option", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_options_it_does_not_cover_stay_float_with_the_reason(option) -> None:
    model = Wrap(nn.MultiheadAttention(8, 2, **option))
    report = quantize_model(model)
    row = next(r for r in report.rows if r.name == "attn")
    assert row.status == "float" and f"{next(iter(option))}=True is not supported" in row.note
    assert type(model.attn) is nn.MultiheadAttention


def test_a_train_step_reaches_every_weight_and_to_float_gives_it_back() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    model = Wrap(attn)
    quantize_model(model)
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        model.attn.train()
        for _ in range(2):
            model(x, x, x)  # observers see data in training
    out, _ = model(x, x, x)
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    names = {n for n, _ in attn.named_parameters()}
    assert {n for n, _ in model.attn.named_parameters()} == names  # still the attention's
    back = model.attn.to_float()
    assert type(back) is nn.MultiheadAttention and back.in_proj_weight is attn.in_proj_weight
    assert not back._forward_pre_hooks and type(back.out_proj) is type(attn.out_proj)
    assert set(back.state_dict()) == set(attn.state_dict())


def test_an_encoder_with_a_padding_mask_evaluates_through_the_quantized_layers() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True by default
    float_encoder = copy.deepcopy(encoder).eval()
    report = quantize_model(encoder)
    assert encoder.use_nested_tensor is False and any(
        "use_nested_tensor" in w for w in report.warnings
    )
    x, padding = torch.randn(4, 6, 16), torch.zeros(4, 6, dtype=torch.bool)
    padding[:, 4:] = True
    encoder.train()
    with torch.no_grad():
        encoder(x, src_key_padding_mask=padding)  # observers see data
    for module in encoder.modules():
        if isinstance(module, Quantizer):
            module.enable_observer(False)
    encoder.eval()
    calls = []
    hook = encoder.layers[0].self_attn.qk.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=padding)
        reference = float_encoder(x, src_key_padding_mask=padding)
    hook.remove()
    assert calls and not out.is_nested
    kept = ~padding
    assert not torch.equal(out[kept], reference[kept])  # quantized, not the fused float layer
    assert (out[kept] - reference[kept]).norm() < 0.2 * reference[kept].norm()


def test_q_k_v_and_the_attention_output_are_quantized_once_by_their_producer() -> None:
    """q, k, v reach the two matmuls and ``pv``'s output reaches ``out_proj`` through reshapes
    and transposes: their producers' output quantizers own the grid (no second fake quant, no
    second rounding), and integer eval still equals `convert`."""
    from qat_lightning import convert
    from qat_lightning.surgery import calibrate

    torch.manual_seed(0)
    model = Wrap(nn.MultiheadAttention(16, 4, batch_first=True))
    x = torch.randn(4, 6, 16)
    calibrate(model, [(x, x, x)])
    attn = model.attn
    owners = {
        (attn.qk, 0): attn.q_proj, (attn.qk, 1): attn.k_proj,
        (attn.pv, 1): attn.v_proj, (attn.out_proj, 0): attn.pv,
    }  # fmt: skip
    for (consumer, index), producer in owners.items():
        assert consumer.input_quantizers[index] is None
        assert consumer.input_encoding(index) is producer.output_quantizers[0]
    assert attn.pv.input_quantizers[0] is not None  # the softmax output: its own, unsigned
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append(m))
        for m in model.modules()
        if isinstance(m, Quantizer)
    ]
    model.train()
    model(x, x, x)[0].sum().backward()
    for hook in hooks:
        hook.remove()
    # each quantizer once: inputs of q/k/v (3), outputs of q/k/v, qk, pv, out_proj (6), the
    # softmax output (1) and 4 weights; the inputs of qk (2), pv's v and out_proj have none
    assert len(seen) == len(set(map(id, seen))) == 3 + 6 + 1 + 4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, x, x)[0], convert(model)(x, x, x)[0])
