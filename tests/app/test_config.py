"""The structured configs and their checks: what composes, what fails and how it says so."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import pytest
import yaml
from app_helpers import CONF, compose_config
from omegaconf import OmegaConf

from qat_lightning.app.config import QuantSchemeConfig
from qat_lightning.app.loggers import wandb_mode
from qat_lightning.app.main import config_dir, help_text, job_overrides, resume_overrides
from qat_lightning.app.train import qat_callback
from qat_lightning.app.validation import (
    ConfigError,
    describe_error,
    quant_overrides,
    quant_scheme,
    validate,
)
from qat_lightning.quant import QuantScheme

PRESETS = ("int8", "int4", "int2", "fixed_q4_4", "lsq4")


def error_line(overrides: list[str]) -> str:
    """What ``qat-train <overrides>`` would print after ``error:`` (compose + validate)."""
    try:
        validate(compose_config(overrides))
    except ConfigError as err:
        return str(err)
    except Exception as err:
        return describe_error(err)
    raise AssertionError(f"{overrides} passed the checks")


def test_scheme_config_is_derived_from_quant_scheme():
    ours = {f.name: f.default for f in dataclasses.fields(QuantSchemeConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(QuantScheme)}
    assert ours == theirs
    # every QuantScheme field is a key of quant.params, typed: a wrong type fails at compose
    assert set(compose_config([]).quant.params) == set(theirs)
    assert error_line(["quant.params.learnable=maybe"]).startswith(
        "quant.params.learnable=maybe is invalid"
    )


@pytest.mark.parametrize("side", ["inputs", "params"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_a_valid_scheme(side, preset):
    cfg = compose_config([f"quant/{side}={preset}"])
    validate(cfg)
    scheme = quant_scheme(cfg, side)
    written = yaml.safe_load((CONF / "quant" / side / f"{preset}.yaml").read_text())
    assert {k: getattr(scheme, k) for k in written} == written


def test_a_preset_is_overridable_field_by_field():
    cfg = compose_config(["quant/params=int4", "quant.params.granularity=per_tensor"])
    scheme = quant_scheme(cfg, "params")
    assert (scheme.bits, scheme.granularity, scheme.symmetric) == (4, "per_tensor", True)


def test_an_interpolated_scheme_field_reaches_the_callback(tmp_path):
    # one observer for both sides, swept once: quant.params.observer='${quant.inputs.observer}'
    cfg = compose_config(
        ["quant.inputs.observer=percentile", "quant.params.observer=${quant.inputs.observer}"]
    )
    qat = qat_callback(cfg.quant, tmp_path)
    assert qat.config.params.observer == qat.config.inputs.observer == "percentile"


@pytest.mark.parametrize(
    "group, options",
    [
        ("model", ["cnn", "resnet20", "resnet18", "mobilenet_v2", "transformer"]),
        ("logger", ["csv", "wandb", "none"]),
        ("trainer", ["default", "cpu", "debug"]),
        ("callbacks", ["default", "none"]),
        ("optim", ["adam", "sgd"]),
        ("experiment", ["smoke", "digits_lsq"]),
    ],
)
def test_every_group_option_composes_and_validates(group, options):
    for option in options:
        validate(compose_config([f"{group}={option}"]))


def test_tensorboard_logger_needs_tensorboard():
    cfg = compose_config(["logger=tensorboard"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"^logger=tensorboard is invalid here: tensorboard"):
            validate(cfg)
    else:
        validate(cfg)


def test_data_experiments_compose_with_a_data_root(tmp_path):
    for experiment, data in (
        ("cifar10_resnet20", "cifar10"),
        ("fashion_mnist_cnn", "fashion_mnist"),
    ):
        cfg = compose_config([f"experiment={experiment}", f"data.root={tmp_path}"])
        assert cfg.data.name == data
        with pytest.raises(ConfigError, match=r"^data\.root=.* is invalid .*nothing is downloaded"):
            validate(cfg)


def test_hparams_search_is_an_optuna_sweep_over_lr_and_bits():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config(["hparams_search=optuna_lr_bits"])
    assert cfg.optimized_metric == "onnx_accuracy"
    validate(cfg)
    raw = yaml.safe_load((CONF / "hparams_search" / "optuna_lr_bits.yaml").read_text())
    assert set(raw["hydra"]["sweeper"]["params"]) == {"optim.qat_lr", "quant.params.bits"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["quant.params.bits=1"], "quant.params.bits=1 is invalid: allowed an integer in 2..16"),
        (["quant.inputs.bits=17"], "quant.inputs.bits=17 is invalid: allowed an integer in 2..16"),
        (
            ["quant.inputs.observer=maxmin"],
            "quant.inputs.observer=maxmin is invalid: allowed one of",
        ),
        (["quant.params.bitz=4"], "quant.params.bitz is not a key of quant.params: allowed bits,"),
        (["+quant.params.bitz=4"], "quant.params.bitz is not a key of quant.params: allowed bits,"),
        (["model=resnet999"], "model=resnet999 is invalid: allowed one of cnn, mobilenet_v2,"),
        (["quant.params.bits=abc"], "quant.params.bits=abc is invalid: Value 'abc'"),
        (
            ["quant.freeze_bn_at=epok:2"],
            "quant.freeze_bn_at=epok:2 is invalid: allowed null, epoch",
        ),
        (["model=transformer", "model.heads=5"], "model.heads=5 is invalid: allowed a divisor"),
        (["data=fashion_mnist", "data.root=/no/such/dir"], "data.root=/no/such/dir is invalid"),
        (["init_from=/no/such.ckpt"], "init_from=/no/such.ckpt is invalid: allowed null or an"),
        (["logger=wandb", "logger.mode=cloud"], "logger.mode=cloud is invalid: allowed one of"),
        (
            ["+quant.overrides.fc={params:{bits:1}}"],
            "quant.overrides['fc']['params']: QuantScheme.bits=1 is invalid",
        ),
        (["quant.params.frac_bits=3"], "quant.params.frac_bits=3 is invalid: allowed None unless"),
        (["quant.quant_delay=step:-1"], "quant.quant_delay=step:-1 is invalid: allowed null,"),
        # a Lightning habit: the two phases have their own epoch counts
        (["trainer.max_epochs=1"], "trainer.max_epochs is not a key of trainer: a run has two"),
        (["+trainer.max_epochs=1"], "trainer.max_epochs is not a key of trainer: a run has two"),
        (["resume=/no/such/run"], "resume=/no/such/run is invalid: allowed null or a qat-train"),
        (["callbacks.progress_bar=bars"], "callbacks.progress_bar=bars is invalid: allowed one"),
        # the default freeze_bn_at=epoch:1 never happens in a 1-epoch QAT phase
        (["qat_epochs=1"], "quant.freeze_bn_at=epoch:1 is invalid: allowed epoch:N with N < qat"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_allowed(overrides, expected):
    line = error_line(overrides)
    assert line.startswith(expected)
    assert "\n" not in line
    if "max_epochs" in expected:
        assert "fp32_epochs" in line and "qat_epochs" in line


def test_overrides_from_the_command_line_become_module_names():
    cfg = compose_config(["+quant.overrides.model.classifier={params:{bits:4}}"])
    validate(cfg)
    assert quant_overrides(cfg.quant.overrides) == {"model.classifier": {"params": {"bits": 4}}}
    cfg = compose_config(["experiment=digits_lsq"])  # YAML: dotted names as they are
    assert quant_overrides(cfg.quant.overrides) == {"model.classifier": {"params": {"bits": 8}}}


def test_a_sweep_is_checked_job_by_job():
    jobs = job_overrides(["quant.params.bits=2,4", "quant.inputs.bits=4,8", "seed=1"])
    assert len(jobs) == 4
    assert ["quant.params.bits=4", "quant.inputs.bits=8", "seed=1"] in jobs


def test_milestones_accept_epoch_and_step():
    cfg = compose_config(["quant.freeze_bn_at=step:100", "quant.quant_delay=1"])
    validate(cfg)
    from qat_lightning.app.validation import milestone

    assert milestone(cfg.quant.freeze_bn_at, "k") == {"step": 100}
    assert milestone(cfg.quant.quant_delay, "k") == {"epoch": 1}


def test_help_says_what_the_tool_does_and_lists_only_user_groups():
    text = help_text(CONF)
    assert text.startswith("qat-train: quantization-aware training")
    assert "  quant/params: fixed_q4_4, int2, int4, int4_g128, int4_g32, int8, lsq4\n" in text
    assert "  quant/inputs: fixed_q4_4, int2, int4, int8, int8_dynamic, lsq4, none\n" in text
    assert "  model: cnn, mobilenet_v2, resnet18, resnet20, transformer\n" in text
    assert "schema" not in text and "resume=" in text


def test_resume_puts_the_runs_own_overrides_first(tmp_path):
    (tmp_path / "results.json").write_text('{"overrides": ["quant.params.bits=4", "seed=3"]}')
    argv = [f"resume={tmp_path}", "callbacks.progress_bar=none"]
    assert resume_overrides(argv) == ["quant.params.bits=4", "seed=3", *argv]
    assert resume_overrides(["seed=1"]) == ["seed=1"]


def test_conf_dir_is_the_repository_conf(monkeypatch, tmp_path):
    assert config_dir() == CONF
    monkeypatch.setenv("QAT_LIGHTNING_CONF", str(tmp_path))
    with pytest.raises(ConfigError, match=r"no config\.yaml in"):
        config_dir()


def test_resolved_config_is_plain_yaml():
    cfg = compose_config([])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["quant"]["params"]["bits"] == 8
    assert container["model"]["name"] == "cnn" and container["data"]["name"] == "digits"


def test_wandb_without_a_key_goes_offline_with_one_notice(monkeypatch, tmp_path, caplog):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with caplog.at_level(logging.WARNING):
        assert wandb_mode(None, tmp_path) == "offline"
    import os

    # the environment is untouched: a multirun's next job must not inherit offline mode
    assert "WANDB_MODE" not in os.environ
    notices = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(notices) == 1 and "offline" in notices[0] and "\n" not in notices[0]


def test_wandb_mode_keeps_an_explicit_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None, tmp_path) == "online"
    assert wandb_mode("disabled", tmp_path) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(None, tmp_path) == "offline"
