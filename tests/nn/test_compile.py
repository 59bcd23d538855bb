"""QAT under ``torch.compile``: a compiled model with a fused Conv-BN trains with the
gradients eager autograd computes (it failed: "modified by an inplace operation"), and
converts and exports."""

from __future__ import annotations

from contextlib import ExitStack

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.export import convert, export_onnx
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import quantize_model

pytestmark = pytest.mark.slow  # compiling on two CPU cores takes about a minute


def _qat_net(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),  # fused with the conv: BN folding simulated in training
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    quantize_model(net)
    with ExitStack() as stack, torch.no_grad():
        for m in net.modules():
            if isinstance(m, QuantModule):
                stack.enter_context(m.compute_encodings())
        net.eval()(x)
    return net.train()


def _train(net: nn.Module, forward, x, y, steps: int = 4) -> list[float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_compiled_qat_model_trains_like_eager_and_exports(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    eager = _qat_net(x)
    eager_losses = _train(eager, eager, x, y)
    net = _qat_net(x)
    compiled = torch.compile(net)
    losses = _train(net, compiled, x, y)
    # the loss goes down, as in eager mode: same gradients, BN statistics and encodings up
    # to float reassociation by the compiler
    assert losses[-1] < losses[0]
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(net.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # convert and export take the compiled wrapper, and give what the eager model gives
    net.eval()
    with torch.no_grad():
        assert torch.equal(convert(compiled)(x), net(x))  # eval mode: the integer simulation
    outputs = []
    for model, name in ((compiled, "compiled.onnx"), (net, "eager.onnx")):
        session = ort.InferenceSession(str(export_onnx(model, x, tmp_path / name)))
        outputs.append(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (outputs[0] == outputs[1]).all()
