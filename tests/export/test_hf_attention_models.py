"""Acceptance on Hugging Face models nobody here wrote (tiny configs, random init, nothing
downloaded): ``BertForSequenceClassification`` and ``GPT2LMHeadModel`` at W8A8, their attention
matmuls quantized through transformers' ``AttentionInterface`` (`surgery.hf_attention`), from
surgery to onnxruntime."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from export_helpers import optimized_op_types, ort_session
from torch import nn

from qat_lightning import convert, export_onnx, quantize_model
from qat_lightning.export.ops import QuantizedOp
from qat_lightning.nn import QuantModule, QuantScaledDotProductAttention
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import hf_attention
from qat_lightning.surgery.calibrate import compute_encodings

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0, use_cache=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _batch(kind: str, batch: int, length: int, seed: int, padded: bool = True) -> dict:
    vocab = 60 if kind == "bert" else 128
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if padded:
        mask[0, length // 2 :] = 0  # one padded sequence
    return {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=g),
        "attention_mask": mask,
    }


MODELS = {"bert": _bert, "gpt2": _gpt2}


def _attention_rows(report) -> list:
    return [r for r in report.rows if r.name.endswith("." + hf_attention.CHILD)]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("padded", [True, False])
def test_with_quantizers_off_the_routed_attention_computes_what_sdpa_computes(kind, padded):
    torch.manual_seed(0)
    model = MODELS[kind]()
    original = copy.deepcopy(model)
    report = quantize_model(model)
    rows = _attention_rows(report)
    assert len(rows) == 2 and all(r.status == "quantized" for r in rows), rows
    assert model.config._attn_implementation == hf_attention.IMPLEMENTATION
    for quantizer in model.modules():
        if isinstance(quantizer, Quantizer):
            quantizer.enable_fake_quant(False).enable_observer(False)
    batch = _batch(kind, 3, 11, 1, padded)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original(**batch).logits)


def test_the_report_names_what_stays_float_and_why() -> None:
    model = _bert()
    report = quantize_model(model)
    layer_norms = [r for r in report.rows if r.before == "LayerNorm"]
    assert len(layer_norms) == 5
    for row in layer_norms:
        assert row.status == "float" and "no integer kernel" in row.note, row
        assert "LayerNormalization" in row.note
    gelus = [r for r in report.rows if r.before == "GELUActivation"]
    assert len(gelus) == 2 and all("Gelu" in r.note for r in gelus), gelus
    for row in _attention_rows(report):
        assert "Softmax float" in row.note and "QLinearSoftmax" in row.note, row.note


def test_a_skipped_attention_runs_sdpa_and_another_implementation_is_reported() -> None:
    torch.manual_seed(0)
    model, batch = _bert(), _batch("bert", 3, 9, 2)
    original = copy.deepcopy(model)
    report = quantize_model(model, skip=["bert.encoder.layer.0.attention.self.quantized_sdpa"])
    assert report.row("bert.encoder.layer.0.attention.self.quantized_sdpa").status == "skipped"
    layer0 = model.bert.encoder.layer[0].attention.self
    assert hf_attention.CHILD not in layer0._modules  # it calls transformers' sdpa itself
    for quantizer in model.modules():
        if isinstance(quantizer, Quantizer):
            quantizer.enable_fake_quant(False).enable_observer(False)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, original(**batch).logits)

    eager = _bert()
    eager.set_attn_implementation("eager")
    report = quantize_model(eager)
    rows = _attention_rows(report)
    assert rows and all(r.status == "float" and "'eager'" in r.note for r in rows)
    assert any("set_attn_implementation('sdpa')" in w for w in report.warnings)
    assert eager.config._attn_implementation == "eager"


def _float_weights_left(model: nn.Module, report) -> list[str]:
    explained = {r.name for r in report.rows if r.status != "quantized" and r.note}
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D, nn.MultiheadAttention))
        and not isinstance(m, QuantModule)
        and name not in explained
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MODELS))
def test_hugging_face_model_goes_w8a8_from_surgery_to_onnxruntime(kind, tmp_path) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]()
    float_model = copy.deepcopy(model)
    report = quantize_model(model)
    assert not _float_weights_left(model, report)
    attention = [m for m in model.modules() if isinstance(m, QuantScaledDotProductAttention)]
    assert len(attention) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_encodings(model, [_batch(kind, 8, 16, s) for s in range(6)])
    for module in attention:
        assert all(bool(q.initialized) for q in module.quantizers())

    model.train()  # a QAT step: gradients reach every weight through the fake quantizers
    batch = _batch(kind, 4, 16, 50)
    logits = model(**batch).logits
    target = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()

    model.eval()
    x = _batch(kind, 32, 16, 99)
    calls = []
    hooks = [m.qk.register_forward_hook(lambda *a: calls.append(1)) for m in attention]
    converted = convert(model)
    with torch.no_grad():
        integer, expected = model(**x).logits, converted(**x).logits
        reference = float_model(**x).logits
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2, "the quantized attention matmuls were bypassed in eval"
    assert all(isinstance(m.qk, QuantizedOp) for m in converted.modules() if hasattr(m, "qk"))
    assert torch.equal(integer, expected)  # integer eval is the converted model, bit for bit
    assert not torch.equal(integer, reference)
    assert (integer - reference).norm() < 0.3 * reference.norm()

    path = export_onnx(model, _batch(kind, 2, 16, 5), tmp_path / "int8.onnx")
    session = ort_session(path)
    served = session.run(None, {i.name: x[i.name].numpy() for i in session.get_inputs()})[0]
    agreement = (served.argmax(-1) == expected.argmax(-1).numpy()).mean()
    assert agreement >= 0.99, agreement  # top-1 (BERT) / per-token argmax (GPT-2)
    ops = optimized_op_types(path, tmp_path)
    assert ops["QLinearMatMul"] >= 2 * 2, ops  # q·kᵀ and p·v of both layers
    projections = 2 * 6 if kind == "bert" else 2 * 4  # q, k, v, out, MLP / c_attn, c_proj, MLP
    integer_matmuls = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"]
    assert integer_matmuls >= projections + 2 * 2 + 1, ops  # + attention + head
    assert ops["MatMul"] + ops["FusedMatMul"] + ops["Gemm"] == 0, ops  # no float matmul left

    fp32_path = tmp_path / "fp32.onnx"
    example = _batch(kind, 2, 16, 5)
    torch.onnx.export(float_model, (), str(fp32_path), kwargs=example, external_data=False)
    assert os.path.getsize(path) <= 0.30 * os.path.getsize(fp32_path)
