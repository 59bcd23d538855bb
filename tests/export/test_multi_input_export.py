"""Models whose forward takes several arguments: positional, keyword, token ids, constants."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from torch import nn

from qat_lightning import (
    QATCallback,
    QuantConfig,
    calibrate,
    export_onnx,
    load_quantized,
    save_quantized,
)
from qat_lightning.export import OnnxModel
from qat_lightning.export.example_input import ExampleInput


class TokensAndFeatures(nn.Module):
    """Token ids, an optional float mask and a keyword scale, as a user writes a text model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids, mask=None, scale: float = 1.0):
        x = self.embed(ids) * scale
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        return self.fc(x)


def _calibrated(model: nn.Module, batches: list) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(model, batches)
    return model.eval()


def _ids(batch: int, length: int, seed: int, vocab: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_constants_are_baked_in_named_and_checked_by_onnx_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = _calibrated(TokensAndFeatures(), [(_ids(4, 6, i), None, 2.0) for i in range(3)])
    with pytest.warns(UserWarning, match=r"mask=None, scale=2\.0 are baked into the graph"):
        path = export_onnx(model, (_ids(4, 6, 9), None, 2.0), tmp_path / "m.onnx")
    onnx_model = OnnxModel(path)
    assert onnx_model.input_names == ["ids"] and onnx_model.constants == {
        "mask": None,
        "scale": 2.0,
    }
    (graph_input,) = onnx.load(str(path)).graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64  # ids stay integer
    assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch", "sequence"]
    ids = _ids(3, 11, 5)  # another batch and sequence length than the example's
    with torch.no_grad():
        expected = model(ids, None, 2.0)
    got = onnx_model(ids, None, 2.0)  # called as the torch model is
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.allclose(got, onnx_model(ids=ids, scale=2.0))
    with pytest.raises(TypeError, match=r"'mask' is a tensor .* baked in mask=None"):
        onnx_model(ids, torch.ones(3, 11))
    with pytest.raises(TypeError, match=r"'scale' is 3\.0, .* allowed 2\.0"):
        onnx_model(ids, scale=3.0)


def test_keyword_tensor_arguments_become_named_inputs(tmp_path) -> None:
    torch.manual_seed(0)
    batches = [{"ids": _ids(4, 6, i), "mask": torch.rand(4, 6)} for i in range(3)]
    model = _calibrated(TokensAndFeatures(), batches)
    example = ExampleInput((_ids(4, 6, 9),), {"mask": torch.rand(4, 6)})
    # The float mask ties the sequence length to its fixed one: the export says so.
    with pytest.warns(UserWarning, match=r"sequence length \(dimension 1 of ids\) is fixed at 6"):
        path = export_onnx(model, example, tmp_path / "m.onnx")
    onnx_model = OnnxModel(path)
    assert onnx_model.input_names == ["ids", "mask"]
    entries = json.loads(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}["qat_lightning.inputs"]
    )
    assert [(e["name"], e.get("dtype"), e.get("shape")) for e in entries[:2]] == [
        ("ids", "int64", ["batch", 6]),
        ("mask", "float32", ["batch", 6]),
    ]
    ids, mask = _ids(5, 6, 3), torch.rand(5, 6)
    with torch.no_grad():
        expected = model(ids, mask=mask)
    assert torch.equal(onnx_model(ids, mask=mask).argmax(-1), expected.argmax(-1))
    card = tmp_path / "README.md"
    from qat_lightning.export import write_model_card

    write_model_card(tmp_path, model, {"onnx": path})
    text = card.read_text()
    assert "| `ids` | int64 | (batch, 6) |" in text and "| `mask` | float32 | (batch, 6) |" in text
    assert "| `scale` | its default, baked in | `1.0` |" in text


@pytest.mark.parametrize(
    "value, shown",
    [
        (["a", "b"], r"example_input=<list of str>\) is invalid: argument 0 is a str"),
        ({1: torch.zeros(2)}, r"example_input=<dict\[int, Tensor\]>\) is invalid: key 1 is a int"),
        ("text", r"example_input=<str>\) is invalid"),
        ((torch.zeros(2), [torch.zeros(2)]), r"argument 1 is a list of Tensor"),
        ((None, 3), r"it holds no tensor"),
    ],
)
def test_a_bad_example_input_is_one_line_naming_it_and_what_is_allowed(value, shown) -> None:
    for call in (
        lambda: export_onnx(nn.Linear(2, 2), value, "unused.onnx"),
        lambda: QATCallback(example_input=value),
    ):
        with pytest.raises(ValueError, match=shown) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "allowed a torch.Tensor, a tuple/list" in message


def _bert(transformers, labels: int = 3):
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=labels,
    )
    return transformers.BertForSequenceClassification(config)  # random init, nothing downloaded


def _bert_batch(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2 :] = 0  # one padded sequence
    return {
        "input_ids": _ids(batch, length, seed, vocab=60),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(batch, length, dtype=torch.int64),
    }


@pytest.mark.slow
def test_hugging_face_bert_exports_named_integer_inputs_with_dynamic_axes(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _calibrated(_bert(transformers), [_bert_batch(4, 12, i) for i in range(4)])
    example = _bert_batch(2, 12, 9)
    path = export_onnx(model, example, tmp_path / "bert.onnx")
    onnx_model = OnnxModel(path)
    assert onnx_model.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    graph = onnx.load(str(path)).graph
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized_inputs & set(onnx_model.input_names)  # token ids are never quantized
    batch = _bert_batch(5, 19, 3)  # another batch size and sequence length
    with torch.no_grad():
        expected = model(**batch).logits
    got = onnx_model(**batch)
    assert got.shape == expected.shape == (5, 3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    # Positional as the forward numbers its parameters, token_type_ids by keyword.
    ids, mask, types = batch.values()
    assert torch.equal(onnx_model(ids, mask, token_type_ids=types), got)
    # The native artifact rebuilds the same integer model; it is called with the same kwargs.
    save_quantized(model, tmp_path / "native", config=QuantConfig())  # calibrate's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_quantized(tmp_path / "native", _bert(transformers))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
