"""Lightning's own LSTM demo (``lightning.pytorch.demos.LightningLSTM``, a small config)
through ``QATCallback`` + ``Trainer.fit``: its LSTM is quantized, trained, and exported."""

from __future__ import annotations

import lightning.pytorch as pl
import onnx
import pytest
import torch
from lightning_modules import trainer_kwargs
from test_multi_input_callback import RandomTokens
from torch.utils.data import DataLoader

from qat_lightning.callback import QATCallback
from qat_lightning.export import OnnxModel, export_onnx, load_quantized
from qat_lightning.export.rnn import IntegerRNN
from qat_lightning.nn import QuantLSTM


def _demo():
    from lightning.pytorch.demos import LightningLSTM
    from lightning.pytorch.demos.lstm import SimpleLSTM

    class TinyLSTM(LightningLSTM):  # Lightning's demo, a small config, no download
        def __init__(self) -> None:
            super().__init__(vocab_size=50)
            self.model = SimpleLSTM(vocab_size=50, ninp=16, nhid=24, nlayers=2, dropout=0.1)

        def prepare_data(self) -> None:
            pass

        def train_dataloader(self):
            return DataLoader(RandomTokens(48, 12, 50, seed=0), batch_size=8, drop_last=True)

    return TinyLSTM


@pytest.mark.slow
def test_lightning_lstm_demo_trains_quantized_and_loads_back_bit_exact(tmp_path) -> None:
    """The native artifact only: the demo's forward takes its state as one tuple argument
    ``(h, c)``, which an ONNX example input cannot hold (export_onnx refuses it, naming it)."""
    pl.seed_everything(0)
    demo = _demo()
    model = demo()
    before = model.model.rnn.weight_hh_l1.detach().clone()
    qat = QATCallback(calibration_batches=2, export_formats=["native"], export_dir=tmp_path / "x")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[qat])).fit(model)
    rnn = model.model.rnn
    assert isinstance(rnn, QuantLSTM)
    assert {r.name: r.status for r in qat.report.rows}["model.rnn"] == "quantized"
    assert all(rnn.param_quantizers[n].is_initialized for n in rnn.weight_names)
    assert not torch.equal(rnn.weight_hh_l1.detach(), before)  # QAT trained the LSTM

    tokens, _ = RandomTokens(6, 15, 50, seed=3)[:]
    hidden = model.model.init_hidden(6)
    model.eval()
    with torch.no_grad():
        expected, (h, c) = model.model(tokens, hidden)
    loaded = load_quantized(qat.export_paths["native"], demo())
    assert isinstance(loaded.model.rnn, IntegerRNN)
    with torch.no_grad():
        got, (h2, c2) = loaded.model(tokens, hidden)
    assert torch.equal(got, expected) and torch.equal(h, h2) and torch.equal(c, c2)

    # ONNX of the demo's SimpleLSTM with its state left to the LSTM (hidden=None: zeros,
    # baked in as a constant): DequantizeLinear -> LSTM nodes, per-token argmax as eval
    with torch.no_grad():
        zero_state, _ = model.model(tokens, None)
    with pytest.warns(UserWarning, match="hidden=None"):
        path = export_onnx(loaded.model, (tokens[:2], None), tmp_path / "lstm.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("LSTM") == 2, ops
    onnx_model = OnnxModel(path)
    outputs = onnx_model(tokens)  # {name: tensor}: the log-probabilities, then h_n and c_n
    got = outputs[onnx_model.output_names[0]]
    assert got.shape == zero_state.shape
    agree = (got.argmax(-1) == zero_state.argmax(-1)).float().mean()
    assert agree >= 0.99, agree
