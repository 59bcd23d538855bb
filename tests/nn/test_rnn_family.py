"""The recurrent family as a module: going in and out, checkpoints, fake quant per gate row."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qat_lightning.nn import QuantGRU, QuantLSTM, fake_quant_eval
from qat_lightning.quant import QuantScheme

U8 = QuantScheme(bits=8, symmetric=False, signed=False)
W8 = QuantScheme(bits=8, granularity="per_channel")


def _calibrated(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad(), layer.compute_encodings():
        layer(x)
    return layer.eval()


def test_from_float_and_to_float_share_the_parameters() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, 2, batch_first=True)
    q = QuantLSTM.from_float(lstm, U8, W8)
    assert isinstance(q, nn.LSTM) and q.weight_ih_l1 is lstm.weight_ih_l1
    back = q.to_float()
    assert type(back) is nn.LSTM and back.weight_hh_l0 is lstm.weight_hh_l0
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], lstm(x)[0], rtol=0, atol=0)


def test_fake_quant_uses_one_scale_per_gate_row_and_gives_ste_gradients() -> None:
    torch.manual_seed(0)
    q = QuantGRU.from_float(nn.GRU(4, 6), U8, W8)
    _calibrated(q, torch.randn(5, 3, 4)).train()
    w = q.weight_hh_l0
    scale = q.param_quantizers["weight_hh_l0"].scale
    assert scale.shape == (18,)  # 3 gates x 6 rows
    torch.testing.assert_close(scale, w.detach().abs().amax(1) / 127)
    out, h = q(torch.randn(5, 3, 4))
    (out.sum() + h.sum()).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_checkpoint_restores_the_encodings_and_eval_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4)
    q = _calibrated(QuantLSTM.from_float(nn.LSTM(4, 6, batch_first=True), U8, W8), x)
    fresh = QuantLSTM.from_float(nn.LSTM(4, 6, batch_first=True), U8, W8)
    fresh.load_state_dict(copy.deepcopy(q.state_dict()))
    fresh.eval()
    with torch.no_grad():
        (a, (h, c)), (b, (h2, c2)) = q(x), fresh(x)
    assert torch.equal(a, b) and torch.equal(h, h2) and torch.equal(c, c2)


def test_integer_eval_and_fake_quant_eval_agree_to_float_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9, 4)
    q = _calibrated(QuantLSTM.from_float(nn.LSTM(4, 6, batch_first=True), U8, W8), x)
    with torch.no_grad():
        integer = q(x)[0]
        with fake_quant_eval():
            fake = q(x)[0]
    torch.testing.assert_close(integer, fake, rtol=0, atol=1e-6)
