"""`nn.split_fake_quant.after_relu`: ReLU and the output fake quant of a fused layer as one
autograd node on the CPU path, against ``quantizer(relu(y))`` on a copy of the quantizer:
the same values, input gradient, output strides and quantizer state, bit for bit.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_lightning.nn.split_fake_quant import after_relu
from qat_lightning.quant import Quantizer, QuantScheme, cpu_fake_quant

FAST = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True)
def _every_size(monkeypatch):
    """Take the vectorized path at every size, so small hypothesis examples exercise it."""
    monkeypatch.setattr(cpu_fake_quant, "MIN_NUMEL", 0)


def _training_twins(g: torch.Generator, observer: str = "minmax") -> tuple[Quantizer, Quantizer]:
    """A calibrated training quantizer, observer on, and an identical copy."""
    scheme = QuantScheme(bits=8, symmetric=False, signed=False, observer=observer)
    ours = Quantizer(scheme).train()
    with ours.compute_encodings():
        ours(torch.relu(torch.randn(4096, generator=g)))
    ours.enable_observer(True)
    return ours, copy.deepcopy(ours)


def _one_node_against_two(ours: Quantizer, twin: Quantizer, y, upstream) -> torch.Tensor:
    """Run both forms on copies of ``y`` (strides kept), compare everything, return ours."""
    a = y.clone(memory_format=torch.preserve_format).requires_grad_()
    b = y.clone(memory_format=torch.preserve_format).requires_grad_()
    got, want = after_relu(ours, a), twin(torch.relu(b))
    assert got.stride() == want.stride()
    got.backward(upstream)
    want.backward(upstream)
    assert torch.equal(got, want) and torch.equal(a.grad, b.grad)
    for key, value in twin.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    return got


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    observer=st.sampled_from(["minmax", "moving_minmax"]),
    widen=st.floats(0.5, 3.0),
)
def test_relu_then_fake_quant_in_one_node_equals_the_two(seed, n, observer, widen):
    """With ReLU's zeros, ties and clipping."""
    g = torch.Generator().manual_seed(seed)
    ours, twin = _training_twins(g, observer)
    y = torch.randn(n, generator=g) * widen
    y[: n // 4] = 0.0  # ReLU's boundary
    got = _one_node_against_two(ours, twin, y, torch.randn(n, generator=g))
    assert got.grad_fn.name().startswith("_FakeQuantizeMasked")  # one node, one mask


@FAST
@given(seed=st.integers(0, 2**31 - 1), widen=st.floats(0.5, 3.0))
def test_relu_then_fake_quant_of_a_channels_last_conv_output(seed, widen):
    """A channels-last conv's output is a permuted view of dense memory: the one node runs in
    memory order and hands back the input's strides."""
    g = torch.Generator().manual_seed(seed)
    ours, twin = _training_twins(g)
    y = (torch.randn(2, 8, 6, 6, generator=g) * widen).to(memory_format=torch.channels_last)
    got = _one_node_against_two(ours, twin, y, torch.randn(y.shape, generator=g))
    assert got.grad_fn.name().startswith("Permute")  # the path ran, in memory order
