"""Hugging Face GPT-2 (tiny config, random init, nothing downloaded): its projections are
transformers' ``Conv1D`` (``x @ W + b``, ``W`` of shape ``(in, out)``) and the LM head a Linear.
Every one is quantized, calibrates on token batches, trains through its fake quantizer, and
the integer eval is the converted model bit for bit."""

from __future__ import annotations

import pytest
import torch
from export_helpers import optimized_op_types, ort_run
from torch import nn

from qat_lightning import convert, export_onnx, quantize_model
from qat_lightning.export.modules import IntegerLayer
from qat_lightning.nn import QuantModule, fake_quant_eval
from qat_lightning.surgery.calibrate import compute_encodings

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tokens(batch: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length))


@pytest.mark.slow
def test_gpt2_projections_quantize_calibrate_train_and_convert_bit_for_bit(tmp_path) -> None:
    torch.manual_seed(0)
    model = _gpt2()
    report = quantize_model(model)
    projections = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (Conv1D, nn.Linear))
    ]
    assert len(projections) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj per block; lm_head
    for name, module in projections:
        assert isinstance(module, QuantModule), (name, report.row(name).note)
        assert module.param_quantizers["weight"] is not None, name
        assert report.row(name).status == "quantized"
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "QuantHFConv1D"
    assert c_attn.param_quantizers["weight"].scale.shape == (3 * 32,)  # per output feature

    compute_encodings(model, [_tokens(8) for _ in range(4)])

    model.train()  # a QAT step: gradients reach every projection through its fake quantizer
    logits = model(_tokens(4)).logits
    nn.functional.cross_entropy(logits.flatten(0, 1), _tokens(4).flatten()).backward()
    for name, module in projections:  # (lm_head's weight is tied to the token embedding's)
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0, name
    model.zero_grad()

    model.eval()
    tokens = _tokens(16)
    converted = convert(model)
    for name, _ in projections:
        assert isinstance(converted.get_submodule(name), IntegerLayer), name
    with torch.no_grad():
        integer = model(tokens).logits
        expected = converted(tokens).logits
        with fake_quant_eval():
            simulated = model(tokens).logits
    assert torch.equal(integer, expected)
    agreement = (integer.argmax(-1) == simulated.argmax(-1)).float().mean().item()
    assert agreement >= 0.99, agreement

    # ONNX (without the key/value cache, which the exporter cannot return): every projection
    # runs an integer kernel in onnxruntime (the attention matmuls stay float for now)
    model.config.use_cache = False
    path = export_onnx(model, tokens[:2], tmp_path / "gpt2.onnx")
    served = ort_run(path, tokens)
    assert (served.argmax(-1) == expected.argmax(-1).numpy()).mean() >= 0.99
    ops = optimized_op_types(path, tmp_path)
    integer_projections = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"]
    assert integer_projections >= len(projections), ops
