"""QATCallback on models whose forward takes several arguments: capture, checkpoint, export."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_modules import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qat_lightning.callback import QATCallback
from qat_lightning.export import OnnxModel


class RandomTokens(Dataset):
    """(inputs, target) blocks of random token ids, as WikiText2 gives them (nothing downloaded)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i, :-1], self.data[i, 1:]


@pytest.mark.slow
def test_lightning_transformer_demo_exports_an_onnx_that_agrees_per_token(tmp_path) -> None:
    from lightning.pytorch.demos import LightningTransformer, Transformer

    class TinyTransformer(LightningTransformer):  # Lightning's demo, a small config
        def __init__(self) -> None:
            super().__init__(vocab_size=50)
            self.model = Transformer(vocab_size=50, ninp=32, nhead=2, nhid=64, nlayers=1)

        def prepare_data(self) -> None:  # the demo downloads WikiText2 here
            pass

        def train_dataloader(self):
            return DataLoader(RandomTokens(32, 12, 50, seed=0), batch_size=8)

    pl.seed_everything(0)
    model = TinyTransformer()
    qat = QATCallback(calibration_batches=2, export_dir=tmp_path / "export")
    with pytest.warns(UserWarning) as caught:
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[qat])).fit(model)
    messages = [str(w.message) for w in caught]
    # Every attention of nn.Transformer is quantized (encoder and decoder, self and cross);
    # only the LayerNorms stay float, and the report says why.
    rows = {r.name: r for r in qat.report.rows}
    for name in ("encoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"):
        row = rows[f"model.transformer.{name}"]
        assert row.status == "quantized", row
    floats = [r for r in rows.values() if r.status == "float"]
    assert floats and all(r.before == "LayerNorm" and r.note for r in floats), floats
    # nn.Transformer checks whether its mask is causal (a branch on tensor values, which
    # torch.export cannot trace): the export traces on the example's values and says so.
    assert any("branches on tensor values" in m for m in messages)
    # The callback captured both arguments of the first forward call: two int64 token blocks.
    assert [a.dtype for a in qat.example_input.args] == [torch.int64, torch.int64]
    onnx_model = OnnxModel(qat.export_paths["onnx"])
    assert onnx_model.input_names == ["inputs", "target"]
    inputs, target = RandomTokens(5, 17, 50, seed=3)[:]  # another batch and sequence length
    model.eval()
    with torch.no_grad():
        expected = model(inputs, target)  # the integer eval
    got = onnx_model(inputs, target)
    assert got.shape == expected.shape == (5 * 17, 50)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.99


class TokensWithFeatures(pl.LightningModule):
    """A forward of token ids, a keyword float feature tensor and a keyword bool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.features = nn.Linear(4, 16)
        self.head = nn.Linear(16, 30)

    def forward(self, ids, features=None, pool: bool = False):
        x = self.embed(ids) + self.features(features).unsqueeze(1)
        return self.head(x.mean(1) if pool else x)

    def training_step(self, batch, batch_idx):
        ids, features, target = batch
        logits = self(ids, features=features, pool=False)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 30, (16, 10), generator=g)  # 2 steps an epoch
        data = torch.utils.data.TensorDataset(ids, torch.randn(16, 4, generator=g), ids)
        return DataLoader(data, batch_size=8)


def _fit(tmp_path, max_epochs: int, ckpt_path=None, export: bool = True):
    pl.seed_everything(0)
    model = TokensWithFeatures()
    qat = QATCallback(
        calibration_batches=2,
        export_dir=tmp_path / "export",
        export_formats=("onnx",) if export else (),
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(
        tmp_path, max_epochs=max_epochs, callbacks=[qat, checkpoint], enable_checkpointing=True
    )
    pl.Trainer(**kwargs).fit(model, ckpt_path=ckpt_path)
    return model, qat


def test_captured_arguments_survive_the_checkpoint_and_a_resume_exports_the_same(tmp_path):
    _, first = _fit(tmp_path / "a", max_epochs=1, export=False)
    example = first.example_input
    assert [type(a) for a in example.args] == [torch.Tensor]
    assert set(example.kwargs) == {"features", "pool"} and example.kwargs["pool"] is False
    assert example.args[0].shape == (2, 10) and example.kwargs["features"].shape == (2, 4)
    # state_dict / load_state_dict: plain CPU tensors, restored into a fresh callback.
    state = first.state_dict()
    tensors = [
        state["example_arguments"]["args"][0],
        state["example_arguments"]["kwargs"]["features"],
    ]
    assert all(t.device.type == "cpu" for t in tensors)
    fresh = QATCallback()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.example_input.args[0], example.args[0])
    assert torch.equal(fresh.example_input.kwargs["features"], example.kwargs["features"])
    assert fresh.example_input.kwargs["pool"] is False
    # A resumed fit is not recalibrated, so it captures nothing: it exports from the checkpoint.
    _, straight = _fit(tmp_path / "b", max_epochs=2)
    with pytest.warns(UserWarning, match=r"pool=False is baked into the graph"):
        resumed, again = _fit(
            tmp_path / "a", max_epochs=2, ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt"
        )
    assert torch.equal(again.example_input.args[0], example.args[0])
    ids, features = torch.randint(0, 30, (3, 7)), torch.randn(3, 4)
    outputs = []
    for qat in (straight, again):
        onnx_model = OnnxModel(qat.export_paths["onnx"])
        assert onnx_model.input_names == ["ids", "features"]
        assert onnx_model.constants == {"pool": False}
        outputs.append(onnx_model(ids, features=features))
    assert torch.equal(outputs[0], outputs[1])  # the resumed run exports what the straight one did
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(outputs[1].argmax(-1), resumed(ids, features=features).argmax(-1))


def test_a_forward_the_export_cannot_take_says_why_at_export(tmp_path):
    class DictBatch(TokensWithFeatures):
        def forward(self, batch: dict):
            return super().forward(batch["ids"], features=batch["features"])

        def training_step(self, batch, batch_idx):
            ids, features, target = batch
            logits = self({"ids": ids, "features": features})
            return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    qat = QATCallback(
        calibration_batches=1, export_dir=tmp_path / "export", export_formats=("onnx",)
    )
    from qat_lightning.callback import QATExportError

    with pytest.raises(
        QATExportError,
        match=r"no example input \(DictBatch.forward was called .*"
        r"argument 0 is a dict.*QATCallback\(example_input",
    ):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[qat])).fit(DictBatch())
