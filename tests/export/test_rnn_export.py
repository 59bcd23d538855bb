"""torch's nn.LSTM / nn.GRU / nn.RNN in small sequence models: int8 weights per gate row,
STE gradients, integer eval equal to `convert`, ONNX DequantizeLinear -> LSTM/GRU/RNN in
onnxruntime, the safetensors artifact round trip, sizes, and what is refused."""

from __future__ import annotations

import os
import warnings

import onnx
import pytest
import torch
from export_helpers import ort_session
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from qat_lightning import convert, export_onnx, load_quantized, save_quantized
from qat_lightning.export.report import layer_report
from qat_lightning.export.rnn import IntegerRNN
from qat_lightning.nn import QuantGRU, QuantLSTM, QuantRNN
from qat_lightning.surgery import QuantConfig, calibrate, quantize_model

CELLS = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}
QUANT_TYPES = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU, nn.RNN: QuantRNN}
ONNX_OPS = {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNN: "RNN"}


class SequenceClassifier(nn.Module):
    """Tokens (or float features) -> a recurrent stack -> a linear head on the time mean (the
    reverse direction's last step alone would see its input once, its weight_hh never)."""

    def __init__(
        self,
        cell: str,
        *,
        batch_first: bool = True,
        bidirectional: bool = False,
        layers: int = 2,
        tokens: bool = True,
        dim: int = 16,
        hidden: int = 24,
    ) -> None:
        super().__init__()
        rnn_type, kwargs = CELLS[cell]
        self.batch_first, self.tokens = batch_first, tokens
        self.embed = nn.Embedding(40, dim) if tokens else nn.Identity()
        self.rnn = rnn_type(
            dim, hidden, layers, batch_first=batch_first, bidirectional=bidirectional, **kwargs
        )
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        return self.head(out.mean(1 if self.batch_first else 0))


def _inputs(model: SequenceClassifier, n: int, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if model.tokens:
        return torch.randint(0, 40, (n, length), generator=g)
    return torch.randn(n, length, model.rnn.input_size, generator=g)


def _quantized(model: SequenceClassifier, **config) -> SequenceClassifier:
    batches = [_inputs(model, 16, seed=s) for s in range(3)]
    report = calibrate(model, batches, **config)
    assert {r.name: r.status for r in report.rows}["rnn"] == "quantized", report
    return model.eval()


def _feed(path, *tensors) -> list:
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, tensors, strict=True)})


@pytest.mark.parametrize(
    ("cell", "batch_first", "bidirectional", "tokens"),
    [
        ("lstm", True, True, True),
        ("lstm", False, False, False),
        ("gru", False, True, True),
        ("gru", True, False, False),
        ("rnn_tanh", True, True, False),
        ("rnn_relu", False, False, True),
    ],
)
def test_recurrent_model_trains_converts_and_runs_in_onnxruntime(
    cell, batch_first, bidirectional, tokens, tmp_path
) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(
        cell, batch_first=batch_first, bidirectional=bidirectional, tokens=tokens
    )
    _quantized(model)
    rnn = model.rnn
    assert isinstance(rnn, QUANT_TYPES[CELLS[cell][0]]) and isinstance(rnn, CELLS[cell][0])
    weights = [n for n, _ in rnn.named_parameters() if n.startswith("weight_")]
    assert len(weights) == 2 * 2 * (2 if bidirectional else 1)
    for name in weights:  # per gate row: one scale per row of the stacked gate matrices
        quantizer = rnn.param_quantizers[name]
        assert quantizer.scheme.bits == 8 and quantizer.scale.shape == (rnn.weight_ih_l0.shape[0],)

    # a train step: STE gradients reach every weight matrix and the biases
    model.train()
    model(_inputs(model, 8, seed=5)).logsumexp(1).mean().backward()
    for name, param in rnn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()

    # integer eval == convert, bit for bit; the weights are int8 codes in the converted model
    model.eval()
    x = _inputs(model, 64, seed=7)
    converted = convert(model)
    layer = converted.rnn
    assert isinstance(layer, IntegerRNN)
    assert not [n for n, _ in layer.named_parameters() if "weight" in n]
    assert all(getattr(layer, f"{n}_codes").dtype == torch.int8 for n in weights)
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(model(x), expected)
    # the weights the converted model computes with are the QAT model's fake-quantized ones
    with torch.no_grad():
        for name in weights:
            fake = rnn.param_quantizers[name](getattr(rnn, name))
            torch.testing.assert_close(layer.weight(name), fake, rtol=0, atol=0)

    # ONNX: each layer one LSTM/GRU/RNN node fed by DequantizeLinear of int8 initializers
    path = export_onnx(model, x[:2], tmp_path / f"{cell}.onnx")
    graph = onnx.load(str(path)).graph
    op = ONNX_OPS[CELLS[cell][0]]
    producers = {out: node for node in graph.node for out in node.output}
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    recurrent = [n for n in graph.node if n.op_type == op]
    assert len(recurrent) == 2, [n.op_type for n in graph.node]
    for node in recurrent:
        for slot in (1, 2):  # W and R
            source = producers[node.input[slot]]
            while source.op_type in ("Reshape", "Transpose", "Identity"):
                source = producers[source.input[0]]
            assert source.op_type == "DequantizeLinear" and source.input[0] in int8, source
    (got,) = _feed(path, x)
    assert (got.argmax(1) == expected.numpy().argmax(1)).mean() >= 0.99
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=2e-2, rtol=0)

    # the native artifact: int8 codes + encodings, loaded into a fresh float model, bit-exact
    save_quantized(model, tmp_path / "native", config=QuantConfig())
    fresh = SequenceClassifier(
        cell, batch_first=batch_first, bidirectional=bidirectional, tokens=tokens
    )
    loaded = load_quantized(tmp_path / "native", fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_onnx_recurrent_outputs_agree_with_convert_to_float_tolerance(cell, tmp_path) -> None:
    """The sequence output and the final states themselves (no quantized head to hide small
    differences), with an initial state given, batch-first and bidirectional."""

    class Outputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rnn_type, kwargs = CELLS[cell]
            self.rnn = rnn_type(6, 10, 2, batch_first=True, bidirectional=True, **kwargs)

        def forward(self, x: torch.Tensor, h0: torch.Tensor):
            state = (h0, torch.tanh(h0)) if cell == "lstm" else h0
            out, final = self.rnn(x, state)
            return (out, *final) if cell == "lstm" else (out, final)

    torch.manual_seed(0)
    model = Outputs()
    batches = [(torch.randn(8, 7, 6), torch.randn(4, 8, 10) * 0.5) for _ in range(2)]
    calibrate(model, batches)
    model.eval()
    x, h0 = torch.randn(5, 11, 6), torch.randn(4, 5, 10) * 0.5
    converted = convert(model)
    with torch.no_grad():
        expected = converted(x, h0)
        for a, b in zip(model(x, h0), expected, strict=True):
            assert torch.equal(a, b)
    # (the state's batch is its dimension 1, which export_onnx keeps static: export at 5)
    path = export_onnx(model, (x, h0), tmp_path / "outputs.onnx")
    got = _feed(path, x, h0)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    cell=st.sampled_from(sorted(CELLS)),
    hidden=st.integers(1, 12),
    layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bits=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_integer_eval_equals_convert_for_any_recurrent_configuration(
    cell, hidden, layers, bidirectional, batch_first, bits, seed
) -> None:
    torch.manual_seed(seed)
    model = SequenceClassifier(
        cell,
        batch_first=batch_first,
        bidirectional=bidirectional,
        layers=layers,
        tokens=False,
        dim=5,
        hidden=hidden,
    )
    batches = [_inputs(model, 4, length=6, seed=seed + s) for s in range(2)]
    calibrate(model, batches, params={"bits": bits})
    model.eval()
    x = _inputs(model, 8, length=5, seed=seed + 9)
    with torch.no_grad():
        assert torch.equal(model(x), convert(model)(x))
        codes = convert(model).rnn.weight_ih_l0_codes
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= qmax


def test_int8_recurrent_files_are_at_most_30_percent_of_fp32(tmp_path) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier("lstm", tokens=False, dim=64, hidden=128, bidirectional=True)
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    _quantized(model)
    x = _inputs(model, 2)
    onnx_path = export_onnx(model, x, tmp_path / "int8.onnx")
    native = save_quantized(model, tmp_path / "native")
    assert os.path.getsize(onnx_path) <= 0.30 * os.path.getsize(fp32)
    assert os.path.getsize(native / "model.safetensors") <= 0.30 * os.path.getsize(fp32)


def test_projection_is_left_float_and_reported() -> None:
    model = nn.Sequential()
    model.add_module("lstm", nn.LSTM(4, 8, proj_size=3))
    report = quantize_model(model, QuantConfig())
    row = {r.name: r for r in report.rows}["lstm"]
    assert row.status == "float" and "proj_size=3" in row.note, row
    assert type(model.lstm) is nn.LSTM


def test_packed_sequence_input_is_refused_naming_the_layer() -> None:
    layer = QuantLSTM.from_float(nn.LSTM(4, 8), {"bits": 8}, {"bits": 8})
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    with pytest.raises(TypeError, match=r"QuantLSTM\(4, 8\): a PackedSequence"):
        layer(packed)


def test_weight_only_and_float_weights_convert_exactly() -> None:
    """``inputs=None`` (int8 weights, float input) and ``params=None`` (float weights,
    quantized input): both convert to the eval model bit for bit."""
    for config in ({"inputs": None}, {"params": None}):
        torch.manual_seed(0)
        model = SequenceClassifier("gru", tokens=False)
        _quantized(model, **config)
        x = _inputs(model, 16, seed=3)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(model)
            assert torch.equal(model(x), converted(x)), config
        stored = [n for n, _ in converted.rnn.named_buffers() if n.endswith("_codes")]
        assert bool(stored) == (config.get("params", 1) is not None), config


def test_layer_report_counts_the_recurrent_weights_as_int8() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier("lstm", tokens=False, dim=64, hidden=128, bidirectional=True)
    _quantized(model)
    row = {r["name"]: r for r in layer_report(convert(model))["layers"]}["rnn"]
    params = sum(p.numel() for p in model.rnn.parameters())
    assert row["status"] == "integer" and row["weight_bits"] == 8 and row["params"] == params
    assert row["stored_bytes"] <= 0.30 * row["float_bytes"]


def test_unbatched_sequence_runs_in_onnxruntime_as_in_convert(tmp_path) -> None:
    """An unbatched ``(seq, features)`` input, as torch's recurrent layers take it."""

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(6, 10, 2, bidirectional=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    torch.manual_seed(0)
    model = Unbatched()
    calibrate(model, [torch.randn(7, 6) for _ in range(2)])
    model.eval()
    x = torch.randn(7, 6)
    converted = convert(model)
    with torch.no_grad():
        expected = converted(x)
        assert torch.equal(model(x), expected) and expected.shape == (7, 20)
    path = export_onnx(model, x, tmp_path / "unbatched.onnx", dynamic_batch=False)
    (got,) = _feed(path, x)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)
