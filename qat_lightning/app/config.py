"""Structured configs: the typed schema behind ``conf/``, registered in Hydra's ConfigStore.

Every YAML file in ``conf/`` merges into one of these dataclasses, so OmegaConf rejects a
typo'd key (``quant.params.bitz=4``) or a value of the wrong type (``trainer.devices`` aside)
while composing, before anything trains. Range and choice checks that a type cannot express
(``bits`` in 2..16, a known observer, an existing data root) live in `validate`.

Groups whose options take different fields (``model``, ``data``, ``logger``) have one schema per
option, stored under ``schema/<group>/<option>``; each YAML option names its schema in its
defaults list (``- /schema/model/resnet20@_here_``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qat_lightning.quant.scheme import QuantScheme


# -- quantization ------------------------------------------------------------------------------
def _scheme_schema() -> type:
    """`QuantScheme`'s fields, types and defaults as a mutable dataclass Hydra can override.

    Derived, not written out: a new `QuantScheme` field is a new config key with no change
    here. (`QuantScheme` itself is frozen, which OmegaConf would turn into a read-only node.)
    """
    hints = typing.get_type_hints(QuantScheme)
    fields = [(f.name, hints[f.name], f.default) for f in dataclasses.fields(QuantScheme)]
    schema = dataclasses.make_dataclass("QuantSchemeConfig", fields)
    schema.__module__ = __name__
    schema.__doc__ = "The fields of `qat_lightning.quant.QuantScheme`, as a Hydra schema."
    return schema


QuantSchemeConfig = _scheme_schema()


@dataclass
class QuantConfig:
    """What `QATCallback` gets: the two schemes (from ``quant/inputs`` and ``quant/params``)
    and the schedule. ``inputs: null`` (``quant/inputs=none``) keeps activations float:
    weight-only quantization. Milestones are ``"epoch:N"`` or ``"step:N"`` (a bare ``N``: an epoch);
    ``null`` means never."""

    inputs: QuantSchemeConfig | None = field(default_factory=QuantSchemeConfig)  # None: float
    params: QuantSchemeConfig = field(default_factory=QuantSchemeConfig)
    calibration_batches: int = 8
    freeze_bn_at: str | None = None
    freeze_observers_at: str | None = None
    quant_delay: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    fuse: bool = True
    integer_eval: bool = True  # validation runs the integer simulation (what the export does)
    export_formats: list[str] = field(default_factory=lambda: ["onnx", "native"])
    log_every_n_steps: int = 10


# -- models ------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class CnnConfig(ModelConfig):
    """The small CNN: conv-BN-ReLU stages of these widths, max pool after the second."""

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])


@dataclass
class ResNet20Config(ModelConfig):
    """He et al.'s CIFAR ResNet: 3 stages of ``blocks`` basic blocks, ``width``/2x/4x channels
    (blocks=3: ResNet-20, 5: ResNet-32, 9: ResNet-56)."""

    name: str = "resnet20"
    width: int = 16
    blocks: int = 3


@dataclass
class TorchvisionConfig(ModelConfig):
    """torchvision resnet18 / mobilenet_v2, random init (``weights=None``). ``small_input``
    swaps the stem for a stride-1 3x3 conv (and drops resnet's max pool), for 8..64 px images."""

    name: str = MISSING
    small_input: bool = True
    width_mult: float = 1.0  # mobilenet_v2 only


@dataclass
class TransformerConfig(ModelConfig):
    """A small ViT: patch embedding, ``depth`` pre-norm encoder blocks, mean pooling."""

    name: str = "transformer"
    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2


# -- data --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    seed: int = 0


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's 8x8 digits (1797 images, ships with scikit-learn)."""

    name: str = "digits"
    test_fraction: float = 0.2


@dataclass
class FolderDataConfig(DataConfig):
    """A data set read from ``root`` (never downloaded): see ``qat_lightning/app/data.py``."""

    root: str = MISSING
    augment: bool = False


# -- training ----------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-2
    qat_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # or "cosine", per phase


@dataclass
class TrainerConfig:
    """Passed to every `lightning.pytorch.Trainer` the run builds (float phase and QAT)."""

    accelerator: str = "auto"
    devices: Any = 1
    precision: Any = "32-true"
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    deterministic: bool = False
    num_sanity_val_steps: int = 0


@dataclass
class CallbacksConfig:
    progress_bar: str = "auto"  # "auto" (tqdm in a terminal, else "lines"), "tqdm", "rich", "none"
    checkpoint: bool = True  # <phase>/last.ckpt every epoch, fp32.pt after the float phase
    lr_monitor: bool = False
    early_stopping_patience: int | None = None  # on <phase>/val_acc


@dataclass
class LoggerConfig:
    name: str = MISSING  # "csv", "tensorboard", "wandb" or "none"


@dataclass
class WandbConfig(LoggerConfig):
    """wandb; with no API key (or ``mode: offline``) it logs offline under ``<run dir>/wandb``
    (or ``$WANDB_DIR``) for a later ``wandb sync``."""

    name: str = "wandb"
    project: str = "qat_lightning"
    entity: str | None = None
    group: str | None = None  # None: the multirun's sweep directory, so a sweep groups
    job_type: str = "qat"
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # "online", "offline", "disabled"; None: online if a key exists
    log_model: bool = True  # the exported model as an Artifact
    log_health: bool = True  # per-layer quantization health table and plots


@dataclass
class SearchConfig:
    """``search=mixed_precision``: per-layer weight bits under a size budget, before QAT."""

    name: str = "none"  # none | mixed_precision
    size_budget: float = 0.15  # weight bytes, or a fraction of fp32 when in (0, 1]
    # quantized activation bytes per sample, or a fraction of fp32 in (0, 1]; None: 8-bit
    activation_budget: float | None = None
    bits: list[int] = field(default_factory=lambda: [2, 4, 8])
    calibration_batches: int = 4  # training batches that calibrate each trial
    eval_batches: int = 4  # validation batches of the per-layer top-1


@dataclass
class Config:
    """The whole run. ``experiment`` and ``hparams_search`` are ``_global_`` overlays."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    logger: LoggerConfig = MISSING
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = 0
    fp32_epochs: int = 6  # float phase before QAT (0: none)
    qat_epochs: int = 2  # 0: PTQ only (calibrate, evaluate, export)
    init_from: str | None = None  # float checkpoint (.ckpt or state_dict .pt) to start from
    resume: str | None = None  # an interrupted run's directory: continue it there
    fp32_cache: bool = True  # reuse the float phase of an earlier run with the same fp32 config
    fp32_cache_dir: str | None = None  # None: <sweep dir>/fp32_cache, else next to the run dir
    output_dir: str | None = None  # None: Hydra's run directory
    run_name: str | None = None  # None: the job's overrides
    optimized_metric: str | None = None  # what main returns to a sweeper, e.g. qat_accuracy
    tags: list[str] = field(default_factory=list)


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "cnn": CnnConfig,
        "resnet20": ResNet20Config,
        "torchvision": TorchvisionConfig,
        "transformer": TransformerConfig,
    },
    "data": {"digits": DigitsConfig, "folder": FolderDataConfig},
    "logger": {"logger": LoggerConfig, "wandb": WandbConfig},
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent). Call before composing."""
    store = ConfigStore.instance()
    store.store(name="qat_train_schema", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=schema)
