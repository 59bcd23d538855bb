"""`qat-train`: the Hydra entry point around `train`.

Where the configs live: ``conf/`` at the top of the repository, found next to the
``qat_lightning`` package. That is where it is in a clone and in an editable install
(``pip install -e .``), the supported way to run the app. ``QAT_LIGHTNING_CONF=<dir>`` points
elsewhere; ``--config-dir <dir>`` (Hydra's own option) adds a directory of your own configs
on top (e.g. ``<dir>/experiment/mine.yaml``).

Before Hydra starts any job, every job's config of this command line (each combination of
a ``-m`` sweep) is composed and checked. A user error prints one line and exits with status 2:

    $ qat-train quant.params.bits=1
    qat-train: error: quant.params.bits=1 is invalid: allowed an integer in 2..16

``qat-train --help`` prints `help_text` (what the tool does, the config groups of ``conf/`` and
their options; not the internal ``schema/*`` groups); ``--hydra-help`` is Hydra's own.
``qat-train resume=<run dir>`` continues an interrupted run with that run's own overrides.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qat_lightning.app.config import register_configs
from qat_lightning.app.validation import ConfigError, describe_error, validate

PROG = "qat-train"
# Hydra flags that print something instead of running a job: no checks needed.
_INFO_FLAGS = ("help", "hydra_help", "info", "shell_completion", "cfg")
MAX_CHECKED_JOBS = 256


def config_dir() -> Path:
    """The ``conf/`` directory: ``$QAT_LIGHTNING_CONF``, else ``<repo>/conf`` next to the
    package.

    Raises:
        ConfigError: neither holds a ``config.yaml``.
    """
    env = os.environ.get("QAT_LIGHTNING_CONF")
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (candidate / "config.yaml").is_file():
        source = "QAT_LIGHTNING_CONF" if env else "the qat_lightning checkout"
        raise ConfigError(
            f"no config.yaml in {candidate} (from {source}): run from a clone installed with "
            "`pip install -e .`, or set QAT_LIGHTNING_CONF to a conf/ directory"
        )
    return candidate.resolve()


HELP = """qat-train: quantization-aware training of a PyTorch Lightning model, as a Hydra app.

A run trains the model in float (fp32_epochs; cached and reused by runs with the same float
config), then with QAT (qat_epochs): QATCallback swaps in quantized layers, calibrates,
fine-tunes, and exports an integer ONNX model and safetensors weights. It evaluates both on the
test set and writes results.json, quant_health.csv and checkpoints to the run directory.

Usage:
  qat-train [group=option] [key=value ...]
  qat-train quant.params.bits=4 quant.inputs.bits=8 model=resnet20 data=cifar10 data.root=DIR
  qat-train -m quant.params.bits=2,4,8          one job per value (a multirun sweep)
  qat-train resume=outputs/DATE/TIME            continue an interrupted run
  qat-train --cfg job                           print the composed config
  qat-train --hydra-help                        Hydra's own options

Config groups (group=option):
"""


def help_text(conf: Path) -> str:
    """``--help``: what the tool does and the option of every group under ``conf``."""
    lines = [HELP.rstrip("\n")]
    for group in sorted(p for p in conf.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            lines.append(f"  {group.relative_to(conf).as_posix()}: {', '.join(options)}")
    lines.append("Every key of the composed config can be set with key=value (see --cfg job).")
    return "\n".join(lines) + "\n"


def resume_overrides(argv: list[str]) -> list[str]:
    """``resume=<dir>`` with the overrides that run was started with put first (the rest of
    the command line still applies after them)."""
    import json

    for arg in argv:
        if arg.startswith(("resume=", "+resume=")):
            path = Path(arg.partition("=")[2]) / "results.json"
            if not path.is_file():
                return argv  # validate says what is wrong with it
            saved = json.loads(path.read_text()).get("overrides") or []
            rest = [a.removeprefix("+") if a == arg else a for a in argv]
            return [o for o in saved if not o.startswith(("resume=", "+resume="))] + rest
    return argv


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """The override list of every job a basic-sweeper multirun of ``overrides`` would launch
    (a sweep over a continuous range is left to its sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    discrete = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
    batches = BasicSweeper.split_arguments(discrete, max_batch_size=None)
    jobs = [job for batch in batches for job in batch]
    return jobs[:MAX_CHECKED_JOBS] or [[]]


def preflight(argv: list[str], conf: Path) -> None:
    """Compose and `validate` every job of this command line; one line and exit 2 on error."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _INFO_FLAGS) or args.config_dir:
        return  # Hydra answers these itself (--config-dir: its own search path)
    try:
        jobs = job_overrides(args.overrides) if args.multirun else [list(args.overrides)]
    except Exception as err:  # a grammar error in an override
        fail(describe_error(err))
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name=PROG):
            for overrides in jobs:
                cfg = compose(args.config_name or "config", overrides=overrides)
                validate(cfg)
    except ConfigError as err:
        fail(str(err))
    except Exception as err:  # composition: a missing option, a typo'd key, a wrong type
        fail(describe_error(err))


def _task(cfg: DictConfig) -> Any:
    from qat_lightning.app.train import train

    try:
        results = train(cfg)
    except ConfigError as err:
        fail(str(err))
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


def main() -> None:
    """``qat-train [overrides]``: Hydra's command line (``-m`` for sweeps, ``--cfg job``...)."""
    import hydra

    try:
        conf = config_dir()
    except ConfigError as err:
        fail(str(err))
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text(conf), end="")
        return
    sys.argv[1:] = resume_overrides(sys.argv[1:])
    register_configs()
    preflight(sys.argv[1:], conf)
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(_task)()


if __name__ == "__main__":
    main()
