"""The quantized ``ShiftedWindowAttention`` (and V2's) computes what torchvision's computes
(quantizers off: shifted or not, padded or not), is registered without importing torchvision,
trains every weight, and gives the float module back."""

from __future__ import annotations

import ast
import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import quantize_model
from qat_lightning.nn import QuantModule, swin_attention
from qat_lightning.nn.registry import quant_type_for
from qat_lightning.nn.swin_attention import QuantShiftedWindowAttentionMixin
from qat_lightning.quant import Quantizer

swin = pytest.importorskip("torchvision.models.swin_transformer")


class Wrap(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def _quantized(attn: nn.Module, off: bool = True) -> Wrap:
    model = Wrap(copy.deepcopy(attn))
    report = quantize_model(model)
    assert isinstance(model.attn, QuantShiftedWindowAttentionMixin), report.table()
    assert isinstance(model.attn, type(attn))
    if off:
        for module in model.modules():
            if isinstance(module, Quantizer):
                module.enable_fake_quant(False).enable_observer(False)
    return model


def test_the_package_does_not_import_torchvision_for_it() -> None:
    tree = ast.parse(inspect.getsource(swin_attention))
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("torchvision")]
    attn = swin.ShiftedWindowAttention(8, [2, 2], [1, 1], 2)
    qtype = quant_type_for(attn)  # made lazily, by module path and class name
    assert qtype is not None and issubclass(qtype, swin.ShiftedWindowAttention)
    assert qtype.__name__ == "QuantShiftedWindowAttention"


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    heads=st.sampled_from([1, 2, 4]),
    window=st.tuples(st.integers(2, 4), st.integers(2, 4)),
    shift=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    bias=st.booleans(),
    v2=st.booleans(),
)
def test_quantizers_off_it_is_torchvision_window_attention(
    seed, heads, window, shift, height, width, bias, v2
) -> None:
    torch.manual_seed(seed)
    shift = [min(s, w - 1) for s, w in zip(shift, window, strict=True)]  # Swin: shift < window
    family = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    attn = family(8, list(window), shift, heads, qkv_bias=bias, proj_bias=bias).eval()
    if bias:
        with torch.no_grad():  # V2 zeroes its key bias in forward: a trained one is not zero
            attn.qkv.bias.normal_()
            if v2:
                attn.logit_scale.uniform_(0.0, 6.0)  # also above the clamp at log(100)
    model = _quantized(attn)
    x = torch.randn(2, height, width, 8)
    with torch.no_grad():
        expected, got = attn(x), model(x)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shift", "size"),
    [([0, 0], (8, 8)), ([2, 2], (8, 8)), ([2, 2], (7, 10)), ([0, 2], (9, 6)), ([2, 2], (4, 3))],
)
def test_without_any_quantizer_shift_and_padding_agree(shift, size) -> None:
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention(16, [4, 4], shift, 2).eval()
    plain = quant_type_for(attn).from_float(attn, None, None).eval()
    assert not list(plain.quantizers())
    x = torch.randn(3, *size, 16)
    torch.testing.assert_close(plain(x), attn(x), rtol=1e-5, atol=1e-6)


def test_the_shift_mask_is_torchvision_mask() -> None:
    """The mask is symmetric, 0 on the diagonal and in the unwrapped top-left window, and the
    shifted attention with it is torchvision's on a padded, shifted map."""
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention(4, [4, 4], [2, 2], 1).eval()
    mask = swin_attention.shift_mask((8, 12), (4, 4), (2, 2), torch.device("cpu"), torch.float32)
    assert mask.shape == (6, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2)) and (mask.diagonal(dim1=1, dim2=2) == 0).all()
    assert (mask[0] == 0).all()  # the top-left window holds one region
    model = _quantized(attn)
    x = torch.randn(2, 8, 12, 4)
    torch.testing.assert_close(model(x), attn(x), rtol=1e-5, atol=1e-6)


def test_a_train_step_reaches_every_weight_and_the_bias_table() -> None:
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)
    model = _quantized(attn, off=False)
    with torch.no_grad():  # calibrate on a few batches
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.enable_fake_quant(False)
        model.train()
        for _ in range(3):
            model(torch.randn(4, 7, 9, 16))
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.enable_fake_quant(True)
    out = model(torch.randn(4, 7, 9, 16))
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    names = {n for n, _ in model.named_parameters()}
    assert "attn.relative_position_bias_table" in names  # float, trained in float
    quantized = model.attn
    assert quantized.param_quantizers["qkv.weight"] is not None
    assert quantized.param_quantizers["proj.weight"] is not None
    # q, k, v are quantized once, by qkv's output; pv's output once, for proj
    assert quantized.qk.input_quantizers[0] is None and quantized.qk.input_quantizers[1] is None
    assert quantized.pv.input_quantizers[1] is None and quantized.proj.input_quantizers[0] is None
    assert quantized.pv.input_quantizers[0].scheme.signed is False  # the probabilities


def test_to_float_gives_torchvision_module_back_with_the_same_parameters() -> None:
    attn = swin.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)
    params = {id(p) for p in attn.parameters()}
    model = _quantized(attn)
    back = model.attn.to_float()
    assert type(back) is swin.ShiftedWindowAttention
    assert type(back.qkv) is nn.Linear and type(back.proj) is nn.Linear
    assert {id(p) for p in back.parameters()} == {id(p) for p in model.attn.parameters()}
    assert len(params) == len(list(back.parameters()))
    x = torch.randn(2, 8, 8, 16)
    torch.testing.assert_close(back.eval()(x), model.attn.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_user_subclass_keeping_its_methods_is_covered() -> None:
    class MyWindowAttention(swin.ShiftedWindowAttention):
        pass

    attn = MyWindowAttention(16, [4, 4], [2, 2], 2).eval()
    model = _quantized(attn)
    assert isinstance(model.attn, MyWindowAttention)
    x = torch.randn(2, 6, 6, 16)
    torch.testing.assert_close(model(x), attn(x), rtol=1e-5, atol=1e-6)
    assert type(model.attn.to_float()) is MyWindowAttention


def test_swin_v2_trains_its_float_parts_and_keys_carry_no_bias() -> None:
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], 2)
    model = _quantized(attn, off=False)
    quantized = model.attn
    assert quantized.qk.input_quantizers[0] is not None  # normalised q: quantized again
    assert quantized.pv.input_quantizers[1] is None  # v: on qkv's grid
    assert not any(isinstance(m, QuantModule) for m in quantized.cpb_mlp.modules())
    with torch.no_grad():
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.enable_fake_quant(False)
        model.train()
        model(torch.randn(4, 8, 8, 16))
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.enable_fake_quant(True)
    model(torch.randn(4, 8, 8, 16)).square().mean().backward()
    for name, param in model.named_parameters():
        if name != "attn.qkv.bias":
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    bias_grad = quantized.qkv.bias.grad
    assert bias_grad[16:32].abs().sum() == 0 and bias_grad[:16].abs().sum() > 0  # as torchvision
    back = quantized.to_float()
    assert type(back) is swin.ShiftedWindowAttentionV2
    assert all(type(m) is nn.Linear for m in (back.qkv, back.proj, back.cpb_mlp[0]))
