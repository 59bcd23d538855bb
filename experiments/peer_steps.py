"""The QAT peers of `bench_qat_step.py --peers`: each builds a W8A8 QAT twin of one float model.

Every builder takes the float model (each side gets its own copy of the same initial weights)
and a calibration batch, and returns a module that trains with that peer's fake quantization,
as close to our scheme (int8 per-channel symmetric weights, 8-bit per-tensor activations,
ranges from a calibration pass) as the peer's public API allows. `SCHEMES` says, per peer,
what it actually quantizes; the differences are real and the table prints them.

The peers are never dependencies of the package: install each into a side directory
(``pip install --no-deps --target DIR/<name> ...`` plus what its import asks for) and pass
``--peer-dir DIR``; its subfolders are appended to ``sys.path``. A peer that does not import
or build on this torch is reported with its exact error instead of a figure.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# What each peer's model quantizes here (printed with the figures).
SCHEMES = {
    "torch_ao": "eager prepare_qat, x86 qconfig: per-channel int8 weights, 7-bit-range uint8 "
    "activations, Conv+BN+ReLU fused (torchvision's quantizable resnet18)",
    "brevitas": "graph quantize(), Int8WeightPerChannelFloat weights, int8/uint8 per-tensor "
    "activations, BN as preprocess_for_quantize leaves it",
    "aimet": "v2 QuantizationSimModel, default_config_per_channel.json, W8A8, "
    "training_range_learning_with_tf_init (learned ranges); AIMET disables the quantizers of a "
    "module called twice (torchvision's shared ReLU in each BasicBlock)",
    "nncf": "nncf.quantize() (per-channel int8 weights, per-tensor int8 activations), then trained",
    "modelopt": "mtq.quantize(INT8_DEFAULT_CFG): per-channel int8 weights, per-tensor int8 "
    "activations, max calibration",
    "torchao": "quantize_(QATConfig): int8 per-channel weights, int8 per-token dynamic "
    "activations, nn.Linear only (torchao QAT has no Conv2d): the convolutions stay float",
}


def add_peer_paths(peer_dir: Path | None) -> None:
    """Append every subfolder of ``peer_dir`` to ``sys.path`` (after the project's own)."""
    if peer_dir is None:
        return
    if not peer_dir.is_dir():
        raise SystemExit(f"--peer-dir {peer_dir}: not a directory")
    for sub in sorted(peer_dir.iterdir()):
        if sub.is_dir() and str(sub) not in sys.path:
            sys.path.append(str(sub))


def brevitas(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP, preprocess_for_quantize, quantize
    from brevitas.quant import Int8WeightPerChannelFloat

    layer_map = {}
    for float_type, entry in COMPUTE_LAYER_MAP.items():
        if entry is not None and "weight_quant" in entry[1]:
            entry = (entry[0], {**entry[1], "weight_quant": Int8WeightPerChannelFloat})
        layer_map[float_type] = entry
    model = quantize(preprocess_for_quantize(model), compute_layer_map=layer_map)
    with torch.no_grad():  # Brevitas' activation scales start from statistics of the data
        model.train()
        model(x)
    return model


def aimet(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import aimet_torch
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    config = (
        Path(aimet_torch.__file__).parent / "common/quantsim_config/default_config_per_channel.json"
    )
    sim = QuantizationSimModel(
        model.eval(),
        dummy_input=x,
        quant_scheme=QuantScheme.training_range_learning_with_tf_init,
        default_output_bw=8,
        default_param_bw=8,
        config_file=str(config),
    )
    sim.compute_encodings(lambda m, _: m(x), None)
    return sim.model.train()


def nncf(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import nncf as nncf_

    return nncf_.quantize(model.eval(), nncf_.Dataset([x]), subset_size=1).train()


def modelopt(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model.eval(), mtq.INT8_DEFAULT_CFG, lambda m: m(x)).train()


def torchao(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    quantize_(
        model, QATConfig(activation_config=activations, weight_config=weights, step="prepare")
    )
    return model.train()


# Peers built from the shared float model; torch.ao needs torchvision's quantizable twin and is
# built by the benchmark itself.
BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
    "brevitas": brevitas,
    "aimet": aimet,
    "nncf": nncf,
    "modelopt": modelopt,
    "torchao": torchao,
}


def build_peers(
    float_model: nn.Module, x: torch.Tensor, names: list[str], log: Callable[[str], None]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Each named peer's QAT model from a copy of ``float_model``; failures as exact errors."""
    models, errors = {}, {}
    for name in names:
        log(f"building {name} ...")
        try:
            models[name] = BUILDERS[name](copy.deepcopy(float_model), x.clone())
        except Exception as error:  # a peer that does not run here is a result, not a crash
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            log(f"{name} failed: {errors[name]}")
    return models, errors
