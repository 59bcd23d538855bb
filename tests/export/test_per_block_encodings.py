"""``encodings.json`` of per-group weights (AIMET's per-block fields) and of dynamic
activations (no scale: computed at run time); `load_quantized` rebuilds both bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dynamic_integer_export import INPUTS, PARAMS, TinyLM, _tiny_lm

from qat_lightning.export import ExportError, convert, load_quantized, save_quantized
from qat_lightning.surgery import QuantConfig


def test_per_group_weights_are_per_block_entries_and_dynamic_inputs_have_no_scale(tmp_path):
    model = _tiny_lm(INPUTS["8da_token_affine"], PARAMS["w4_g32"])
    save_quantized(model, tmp_path / "art")
    saved = json.loads((tmp_path / "art" / "encodings.json").read_text())
    weight = saved["param_encodings"]["mlp.2.weight"]  # Linear(128, 64), g32: 4 blocks a row
    assert weight["enc_type"] == "PER_BLOCK" and weight["granularity"] == "per_group"
    assert weight["block_size"] == 32 == weight["group_size"] and weight["block_axis"] == 1
    assert weight["scale_shape"] == [64, 4] and len(weight["scale"]) == 64 * 4
    assert weight["bits"] == 4 and weight["dynamic"] is False
    expected = model.mlp[2].param_quantizers["weight"].encoding()[0]
    assert torch.equal(torch.tensor(weight["scale"]).reshape(64, 4), expected)
    table = saved["param_encodings"]["embed.weight"]  # Embedding(50, 64): 2 blocks a row
    assert table["enc_type"] == "PER_BLOCK" and table["scale_shape"] == [50, 2]
    dynamic = saved["activation_encodings"]["mlp.0.input.0"]
    assert dynamic["dynamic"] is True and dynamic["granularity"] == "per_token"
    assert dynamic["enc_type"] == "PER_TOKEN" and dynamic["bits"] == 8
    assert "scale" not in dynamic and "zero_point" not in dynamic


CASES = [
    ("8da_token_affine", "w4_g32"),
    ("8da_tensor_u8", "w8_g32_affine"),
    ("8da_token_sym", "w8_channel"),
    ("static_u8", "w4_g32"),
]


@pytest.mark.parametrize(("inputs", "params"), CASES)
def test_load_quantized_rebuilds_the_converted_model_from_a_fresh_float_model(
    inputs, params, tmp_path
):
    model = _tiny_lm(INPUTS[inputs], PARAMS[params])
    config = QuantConfig(inputs=INPUTS[inputs], params=PARAMS[params])
    save_quantized(model, tmp_path / "art", config=config)
    torch.manual_seed(7)  # other float weights: everything comes from the artifact
    loaded = load_quantized(tmp_path / "art", TinyLM())
    idx = torch.randint(0, 50, (4, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), convert(model)(idx))


_SAVED: dict = {}


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**16))
def test_the_loaded_8da4w_model_equals_the_converted_one_on_any_tokens(batch, length, seed):
    if not _SAVED:  # one artifact for every example
        import tempfile

        model = _tiny_lm(INPUTS["8da_token_affine"], PARAMS["w4_g32"])
        directory = save_quantized(model, tempfile.mkdtemp() + "/art", config=None)
        config = QuantConfig(inputs=INPUTS["8da_token_affine"], params=PARAMS["w4_g32"])
        _SAVED.update(
            converted=convert(model), loaded=load_quantized(directory, TinyLM(), config=config)
        )
    idx = torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(_SAVED["loaded"](idx), _SAVED["converted"](idx))


def test_loading_dynamic_entries_into_a_static_config_names_the_tensor(tmp_path):
    model = _tiny_lm(INPUTS["8da_token_affine"], PARAMS["w4_g32"])
    save_quantized(model, tmp_path / "art")
    static = QuantConfig(inputs=INPUTS["static_u8"], params=PARAMS["w4_g32"])
    message = r"tensor '[\w.]+\.input\.0'.*dynamic=True.*dynamic=False"
    with pytest.raises(ExportError, match=message):
        load_quantized(tmp_path / "art", TinyLM(), config=static)
