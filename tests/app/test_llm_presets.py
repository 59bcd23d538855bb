"""The LLM-style presets: per-group int4 weights, weight-only and dynamic int8 activations."""

from __future__ import annotations

import pytest
from app_helpers import CONF, compose_config

from qat_lightning.app.config import register_configs
from qat_lightning.app.main import preflight
from qat_lightning.app.train import qat_callback
from qat_lightning.app.validation import quant_scheme, validate


@pytest.mark.parametrize("preset, group_size", [("int4_g32", 32), ("int4_g128", 128)])
def test_weight_only_per_group_presets_reach_the_callback(preset, group_size, tmp_path):
    argv = [f"quant/params={preset}", "quant/inputs=none"]
    register_configs()
    preflight(argv, CONF)  # what `qat-train quant/params=int4_g32 quant/inputs=none` checks
    cfg = compose_config(argv)
    validate(cfg)
    assert cfg.quant.inputs is None
    callback = qat_callback(cfg.quant, tmp_path)
    assert callback.config.inputs is None  # weight-only
    params = callback.config.params
    assert (params.bits, params.granularity, params.group_size) == (4, "per_group", group_size)


def test_the_group_size_is_overridable_and_checked():
    cfg = compose_config(["quant/params=int4_g32", "quant.params.group_size=64"])
    assert quant_scheme(cfg, "params").group_size == 64
    with pytest.raises(SystemExit):
        preflight(["quant/params=int4_g32", "quant.params.group_size=0"], CONF)


def test_int8_dynamic_is_8da4w_with_int4_g32(tmp_path):
    cfg = compose_config(["quant/inputs=int8_dynamic", "quant/params=int4_g32"])
    validate(cfg)
    inputs = qat_callback(cfg.quant, tmp_path).config.inputs
    assert inputs.dynamic and inputs.granularity == "per_token" and inputs.bits == 8
    assert (inputs.symmetric, inputs.signed) == (False, True)  # torchao's int8 per-token form


def test_dynamic_weights_are_refused_before_training(capsys):
    with pytest.raises(SystemExit):
        preflight(["quant.params.dynamic=true", "quant.params.granularity=per_tensor"], CONF)
    assert "dynamic=True is for activations" in capsys.readouterr().err
