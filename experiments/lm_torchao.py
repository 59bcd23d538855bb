"""Issue 14's peer: torchao 0.18's QAT of `lm_stdlib.py`'s model, on the same data, steps,
seed and learning rate (see that script's docstring, step 4).

torchao comes from the environment (the dev extra) or from the experiment's ``--peer-dir``
(a ``pip install --target`` folder, put on ``sys.path`` only while it is imported); where it
does not import or run, the result says why instead of a perplexity.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from lm_models import Scheme, fit, quantized_layers


def torchao_in_environment() -> bool:
    """torchao is importable without ``--peer-dir`` (the dev extra installs it)."""
    return importlib.util.find_spec("torchao") is not None


def torchao_available(peer_dir: Path) -> bool:
    """torchao will run: installed, or in ``peer_dir``."""
    return torchao_in_environment() or (peer_dir / "torchao").is_dir()


def run_qat_torchao(exp: Any, name: str, scheme: Scheme) -> dict:
    """torchao's QAT of the same model, or ``{"skipped": why}``. The embeddings, where the
    scheme quantizes them, get the weight config alone (torchao has no activation fake
    quantization for an embedding, and ours has no input encoding there either). ``exp``: an
    `lm_stdlib.Experiment` (its args, corpus and ``module(lr, steps)`` factory)."""
    a = exp.args
    side = not torchao_in_environment()
    if side and not (a.peer_dir / "torchao").is_dir():
        return {
            "skipped": f"torchao is neither installed (the dev extra installs it) nor in "
            f"--peer-dir {a.peer_dir}"
        }
    if side:
        sys.path.insert(0, str(a.peer_dir))
    try:
        import torchao
        from torchao.quantization import quantize_
        from torchao.quantization.qat import (
            FakeQuantizedEmbedding,
            FakeQuantizedLinear,
            IntxFakeQuantizeConfig,
            QATConfig,
        )
    except Exception as error:
        return {"skipped": f"torchao does not import: {type(error).__name__}: {error}"}
    finally:
        if side:
            sys.path.remove(str(a.peer_dir))
    try:
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
        activation = None
        if scheme.inputs is not None:
            activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        module = exp.module(a.qat_lr, a.qat_steps)
        config = QATConfig(activation_config=activation, weight_config=weight, step="prepare")
        quantize_(module.model, config)  # every nn.Linear (quantize_'s default filter)
        if scheme.embeddings:
            quantize_(
                module.model,
                QATConfig(weight_config=weight, step="prepare"),
                filter_fn=lambda m, _fqn: isinstance(m, torch.nn.Embedding),
            )
        counts = quantized_layers(module, FakeQuantizedLinear, FakeQuantizedEmbedding)
        loader = exp.corpus.train_loader()
        label = f"qat torchao {name}"
        train_s = fit(module, loader, a.qat_steps, label, seed=a.seed, root=a.out)
        return {
            "version": torchao.__version__,
            "train_s": train_s,
            **counts,
            **exp.evaluate(module),
        }
    except Exception as error:
        return {"skipped": f"torchao {torchao.__version__} fails: {type(error).__name__}: {error}"}
