"""Config checks that run before anything trains, and one-line messages for every config error.

Types and key names are checked by OmegaConf against the schemas in `config` while Hydra
composes; `validate` checks what a type cannot say (ranges, choices, files that must exist).
Every failure is a `ConfigError` whose message is one line: the key, the value, what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from qat_lightning.app.data import DATASETS, check_data
from qat_lightning.app.models import MODELS
from qat_lightning.callback.schedule import Milestone
from qat_lightning.quant import QuantScheme
from qat_lightning.surgery import QuantConfig

RESULT_METRICS = ("fp32_accuracy", "qat_accuracy", "onnx_accuracy", "agreement")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
PROGRESS_BARS = ("auto", "tqdm", "rich", "lines", "none")
LOGGERS = ("csv", "tensorboard", "wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
EXPORT_FORMATS = ("onnx", "native")
# Groups whose options come from optional Hydra plugins: how to get them.
PLUGIN_HINTS = {
    "hydra/launcher": 'install the launchers with: pip install "qat_lightning[launchers]"',
    "hydra/sweeper": 'install the Optuna sweeper with: pip install "qat_lightning[optuna]"',
}


# Keys people try from other Lightning apps, and what this one has instead.
KEY_HINTS = {
    key: "a run has two phases: set fp32_epochs=N (float, 0: none) and qat_epochs=N (QAT)"
    for key in ("trainer.max_epochs", "trainer.min_epochs", "trainer.max_steps")
}


class ConfigError(ValueError):
    """A bad config value; ``str(error)`` is one line naming the key, the value and what is
    allowed."""


def cli_value(value: Any) -> str:
    """A value the way it is written on the command line (``null``, ``true``, ``foo``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (DictConfig, dict)) or OmegaConf.is_list(value):
        return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return str(value)


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={cli_value(value)} is invalid: allowed {allowed}")


def milestone(value: str | None, key: str) -> dict[str, int] | None:
    """``"epoch:3"`` / ``"step:500"`` / ``"3"`` as QATCallback's ``{"epoch": 3}``; None stays.

    The config writes a milestone as one string; `Milestone.parse` (what `QATCallback` runs)
    decides what is valid.
    """
    if value is None:
        return None
    unit, _, n = str(value).rpartition(":")
    as_dict = {unit or "epoch": int(n) if n.isdigit() else n}
    try:
        Milestone.parse(key, as_dict)
    except ValueError as err:
        raise invalid(key, value, "null, epoch:N or step:N with N >= 0") from err
    return as_dict


def quant_overrides(node: Any) -> dict[str, Any]:
    """``quant.overrides`` with module names as dotted keys.

    On the command line ``+quant.overrides.model.classifier={params:{bits:8}}`` nests one dict
    per name part; a YAML file may write ``"model.layer4.*": {params: ...}`` directly. A dict
    whose keys are all ``inputs``/``params`` is a scheme change; any other key is a name part.
    """
    overrides = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and not set(value) <= {"inputs", "params"}:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = value

    for key, value in (overrides or {}).items():
        walk(str(key), value)
    return flat


# -- structure -----------------------------------------------------------------------------------
def check_keys(node: DictConfig, path: str = "") -> None:
    """Every key of a typed node is a field of its dataclass (``+key=value`` slips past struct
    mode, so composition alone does not catch it)."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in allowed:
                where = path or "the config"
                full = f"{path + '.' if path else ''}{key}"
                if full in KEY_HINTS:
                    raise ConfigError(f"{full} is not a key of {where}: {KEY_HINTS[full]}")
                raise ConfigError(
                    f"{path + '.' if path else ''}{key} is not a key of {where}: allowed "
                    f"{', '.join(allowed)}"
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{path}.{key}" if path else str(key))


# -- values --------------------------------------------------------------------------------------
def _int_at_least(cfg: DictConfig, key: str, low: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise invalid(key, value, f"an integer >= {low}" + (" or null" if optional else ""))


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...] | list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise invalid(key, value, f"one of {', '.join(choices)}")


def _fraction(cfg: DictConfig, key: str, low_open: bool) -> None:
    value = OmegaConf.select(cfg, key)
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        raise invalid(key, value, f"a number in {'(' if low_open else '['}0, 1)")


def quant_scheme(cfg: DictConfig, side: str) -> QuantScheme | None:
    """``quant.<side>`` as a `QuantScheme` (its own checks), its errors named by config key;
    None where it is ``null`` (``quant/inputs=none``: weight-only)."""
    if cfg.quant[side] is None:
        return None
    fields = OmegaConf.to_container(cfg.quant[side], resolve=True)
    try:
        return QuantScheme(**fields)
    except ValueError as err:
        text = str(err)
        for name, value in fields.items():  # QuantScheme says "QuantScheme.<field>=<repr> ..."
            prefix = f"QuantScheme.{name}={value!r}"
            if text.startswith(prefix):
                text = f"quant.{side}.{name}={cli_value(value)}{text[len(prefix) :]}"
                break
        else:
            text = f"quant.{side}: {text}"
        raise ConfigError(text) from err


def _check_quant(cfg: DictConfig) -> None:
    schemes = {side: quant_scheme(cfg, side) for side in ("inputs", "params")}
    _int_at_least(cfg, "quant.calibration_batches", 1)
    _int_at_least(cfg, "quant.log_every_n_steps", 1)
    for name in ("freeze_bn_at", "freeze_observers_at", "quant_delay"):
        parsed = milestone(cfg.quant[name], f"quant.{name}")
        # qat_epochs=0 (PTQ) has no schedule; an epoch milestone past the QAT phase would
        # never happen (QATCallback refuses it at fit start, after the float phase: say it now)
        if parsed and "epoch" in parsed and 0 < cfg.qat_epochs <= parsed["epoch"]:
            raise invalid(
                f"quant.{name}",
                cfg.quant[name],
                f"epoch:N with N < qat_epochs={cfg.qat_epochs} (QAT epochs count from 0), "
                "step:N, or null",
            )
    for fmt in cfg.quant.export_formats:
        if fmt not in EXPORT_FORMATS:
            raise invalid("quant.export_formats", list(cfg.quant.export_formats), "onnx, native")
    try:
        QuantConfig.from_any(
            {
                **schemes,
                "overrides": quant_overrides(cfg.quant.overrides),
                "skip": list(cfg.quant.skip),
                "fuse": cfg.quant.fuse,
            }
        )
    except ValueError as err:
        raise ConfigError(str(err).replace("QuantConfig.", "quant.", 1)) from err


def _check_model(cfg: DictConfig) -> None:
    _choice(cfg, "model.name", sorted(MODELS))
    model = cfg.model
    positive = {
        "cnn": [],
        "resnet20": ["width", "blocks"],
        "transformer": ["patch_size", "dim", "depth", "heads", "mlp_ratio"],
    }.get(model.name, [])
    for key in positive:
        _int_at_least(cfg, f"model.{key}", 1)
    if model.name == "cnn" and (
        not model.channels or any(isinstance(c, bool) or c < 1 for c in model.channels)
    ):
        raise invalid("model.channels", list(model.channels), "a non-empty list of integers >= 1")
    if model.name == "transformer" and model.dim % model.heads:
        raise invalid("model.heads", model.heads, f"a divisor of model.dim={model.dim}")
    if model.name in ("resnet18", "mobilenet_v2") and not model.width_mult > 0:
        raise invalid("model.width_mult", model.width_mult, "a number > 0")


def _check_data(cfg: DictConfig) -> None:
    _choice(cfg, "data.name", sorted(DATASETS))
    for key in ("batch_size", "eval_batch_size"):
        _int_at_least(cfg, f"data.{key}", 1)
    _int_at_least(cfg, "data.num_workers", 0)
    _int_at_least(cfg, "data.max_train_samples", 1, optional=True)
    _int_at_least(cfg, "data.max_test_samples", 1, optional=True)
    _fraction(cfg, "data.val_fraction", low_open=False)
    if "test_fraction" in cfg.data:
        _fraction(cfg, "data.test_fraction", low_open=True)
    problem = check_data(cfg.data)
    if problem is not None:
        raise ConfigError(problem)


def _check_search(cfg: DictConfig) -> None:
    _choice(cfg, "search.name", ("none", "mixed_precision"))
    budget = cfg.search.size_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise invalid("search.size_budget", budget, "a fraction of fp32 in (0, 1] or bytes > 1")
    act = cfg.search.get("activation_budget")
    if act is not None and (isinstance(act, bool) or not isinstance(act, (int, float)) or act <= 0):
        raise invalid(
            "search.activation_budget", act, "null, a fraction of fp32 in (0, 1] or bytes > 1"
        )
    bits = list(cfg.search.bits)
    if not bits or not all(isinstance(b, int) and 2 <= b <= 16 for b in bits):
        raise invalid("search.bits", bits, "a non-empty list of integers in 2..16")
    _int_at_least(cfg, "search.calibration_batches", 1)
    _int_at_least(cfg, "search.eval_batches", 1)


def _check_training(cfg: DictConfig) -> None:
    _int_at_least(cfg, "fp32_epochs", 0)
    _int_at_least(cfg, "qat_epochs", 0)  # 0: PTQ only
    _check_search(cfg)
    _choice(cfg, "optim.name", OPTIMIZERS)
    _choice(cfg, "optim.scheduler", SCHEDULERS)
    if not cfg.optim.lr > 0:
        raise invalid("optim.lr", cfg.optim.lr, "a number > 0")
    if cfg.optim.qat_lr is not None and not cfg.optim.qat_lr > 0:
        raise invalid("optim.qat_lr", cfg.optim.qat_lr, "a number > 0 or null (lr / 10)")
    if cfg.optim.weight_decay < 0:
        raise invalid("optim.weight_decay", cfg.optim.weight_decay, "a number >= 0")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = cfg.trainer[key]
        ok = value is None or (
            not isinstance(value, bool)
            and (
                (isinstance(value, int) and value >= 0)
                or (isinstance(value, float) and 0.0 <= value <= 1.0)
            )
        )
        if not ok:
            raise invalid(
                f"trainer.{key}", value, "null, a number of batches >= 0 or a fraction in [0, 1]"
            )
    _int_at_least(cfg, "trainer.log_every_n_steps", 1)
    _choice(cfg, "callbacks.progress_bar", PROGRESS_BARS)
    if cfg.callbacks.progress_bar == "rich" and importlib.util.find_spec("rich") is None:
        raise invalid("callbacks.progress_bar", "rich", "tqdm or none (rich is not installed)")
    _int_at_least(cfg, "callbacks.early_stopping_patience", 1, optional=True)
    if cfg.init_from is not None and not Path(cfg.init_from).is_file():
        raise invalid("init_from", cfg.init_from, "null or an existing checkpoint file")
    if cfg.resume is not None and not (Path(cfg.resume) / "results.json").is_file():
        raise invalid("resume", cfg.resume, "null or a qat-train run directory (with results.json)")
    if cfg.optimized_metric is not None:
        _choice(cfg, "optimized_metric", RESULT_METRICS)


def _check_logger(cfg: DictConfig) -> None:
    _choice(cfg, "logger.name", LOGGERS)
    name = cfg.logger.name
    if name == "tensorboard" and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise ConfigError(
            "logger=tensorboard is invalid here: tensorboard is not installed "
            '(pip install "qat_lightning[tensorboard]"); allowed csv, wandb, none'
        )
    if name == "wandb" and cfg.logger.mode is not None:
        _choice(cfg, "logger.mode", WANDB_MODES)


def validate(cfg: DictConfig) -> None:
    """Check a composed config; raise `ConfigError` (one line) at the first bad value.

    Example:
        >>> validate(compose("config", overrides=["quant.params.bits=1"]))
        ConfigError: quant.params.bits=1 is invalid: allowed an integer in 2..16
    """
    try:
        check_keys(cfg)
        _check_quant(cfg)
        _check_model(cfg)
        _check_data(cfg)
        _check_training(cfg)
        _check_logger(cfg)
    except OmegaConfBaseException as err:  # e.g. a missing mandatory value, a bad interpolation
        raise ConfigError(describe_error(err)) from err


# -- Hydra / OmegaConf errors as one line ------------------------------------------------------
def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def describe_error(err: BaseException) -> str:
    """One line for a composition error (a missing group option, a typo'd key, a wrong type)."""
    from hydra.errors import MissingConfigException

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if not group:
            return f"config {option!r} not found: {_first_line(str(err))}"
        allowed = ", ".join(o for o in (err.options or []) if not o.startswith("_"))
        line = f"{group}={option} is invalid: allowed one of {allowed or '(none installed)'}"
        hint = PLUGIN_HINTS.get(group)
        return f"{line}; {hint}" if hint else line
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key, msg = cause.full_key, _first_line(cause.msg or str(cause))
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and " not in " in msg:
            if key in KEY_HINTS:
                return f"{key} is not a key of {key.rpartition('.')[0]}: {KEY_HINTS[key]}"
            schema = cause.object_type
            parent = key.rpartition(".")[0] or "the config"
            if not dataclasses.is_dataclass(schema):  # a free-form dict such as quant.overrides
                return f"{key} is not a key of {parent}: add a new key with +{key}=..."
            allowed = ", ".join(f.name for f in dataclasses.fields(schema))
            return f"{key} is not a key of {parent}: allowed {allowed}"
        value = getattr(cause, "value", None)
        shown = f"={cli_value(value)}" if value is not None else ""
        return f"{key}{shown} is invalid: {msg}"
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:500]
