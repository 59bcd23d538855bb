"""A tiny Hugging Face GPT-2 (random init, nothing downloaded) under torchao's 8da4w scheme:
dynamic int8 per-token activations and int4 g32 weights. Its projections are swapped from
transformers' ``Conv1D`` to ``nn.Linear`` first (``nn.hf_conv1d`` has no per-group or
dynamic form), so every projection is a per-group Linear; onnxruntime runs each as
``MatMulInteger`` and the logits agree with `convert`'s integer simulation."""

from __future__ import annotations

import pytest
import torch
from export_helpers import optimized_op_types, ort_run
from test_dynamic_integer_export import INPUTS, PARAMS, _agree
from torch import nn

from qat_lightning.export import convert, export_onnx, load_quantized, save_quantized
from qat_lightning.export.grouped import GroupedIntegerLinear
from qat_lightning.surgery import QuantConfig, quantize_model

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D
CONFIG = QuantConfig(inputs=INPUTS["8da_token_affine"], params=PARAMS["w4_g32"])


def _as_linear(conv: nn.Module) -> nn.Linear:
    """``Conv1D`` computes ``x @ W + b`` with ``W`` of shape ``(in, out)``: the same Linear."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def _gpt2_with_linears(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64, bos_token_id=0,
        eos_token_id=0, use_cache=False,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _as_linear(module))
    return model.eval()


def _tokens(batch: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length))


def _qat_gpt2() -> nn.Module:
    model = _gpt2_with_linears()
    quantize_model(model, CONFIG)
    model.train()
    with torch.no_grad():
        for _ in range(2):  # the weight observers run in training
            model(_tokens(4))
    return model.eval()


@pytest.mark.slow
def test_gpt2_8da4w_runs_integer_matmuls_in_onnxruntime_and_agrees_with_convert(tmp_path):
    model = _qat_gpt2()
    converted = convert(model)
    linears = [n for n, m in converted.named_modules() if isinstance(m, GroupedIntegerLinear)]
    assert len(linears) == 2 * 4 + 1, linears  # c_attn, c_proj, c_fc, mlp.c_proj; lm_head
    path = export_onnx(converted, _tokens(2), tmp_path / "gpt2.onnx")
    ops = optimized_op_types(path, tmp_path)
    assert ops["MatMulInteger"] + ops["MatMulIntegerToFloat"] == len(linears), ops
    tokens = _tokens(8)
    with torch.no_grad():
        expected = converted(tokens).logits.numpy()
    _agree(ort_run(path, tokens), expected)


def test_gpt2_8da4w_artifact_round_trips_to_the_converted_model(tmp_path):
    model = _qat_gpt2()
    converted = convert(model)
    save_quantized(converted, tmp_path / "art", config=CONFIG)
    loaded = load_quantized(tmp_path / "art", _gpt2_with_linears(seed=1))
    tokens = _tokens(4)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, converted(tokens).logits)
