"""Every ``conf/experiment/*.yaml`` composes, validates and runs end to end for a few steps, so
the experiment configs that experiments/README.md quotes cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_helpers import CONF, TINY, compose_config

from qat_lightning.app.train import train
from qat_lightning.app.validation import validate

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
# Where an experiment's data lives; experiments not listed use the embedded digits set.
DATA_ROOTS = {
    "fashion_mnist": (SHARED, SHARED / "FashionMNIST" / "raw"),
    "cifar10": (SHARED / "cifar10-partial", SHARED / "cifar10-partial" / "cifar-10-batches-py"),
}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_the_experiments_are_found():
    assert {"fashion_mnist_cnn", "cifar10_resnet20", "smoke"} <= set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_a_few_steps_on_a_tiny_slice(experiment, tmp_path):
    data = compose_config([f"experiment={experiment}"]).data.name
    overrides = [f"experiment={experiment}", *TINY, "fp32_epochs=1", "logger=none"]
    overrides.append("quant.freeze_observers_at=null")  # an overlay's epoch:N is past 1 epoch
    if data in DATA_ROOTS:
        root, needed = DATA_ROOTS[data]
        if not needed.is_dir():
            pytest.skip(f"experiment={experiment} needs {data} at {needed}, absent on this machine")
        overrides.append(f"data.root={root}")
    cfg = compose_config([*overrides, f"output_dir={tmp_path}"])
    validate(cfg)
    results = train(cfg)
    assert results["config"]["data"]["name"] == data
    # 64 test samples: every figure counts whole samples, and the exported model can differ
    # from the QAT model only on the samples where their predictions disagree
    for key in ("fp32_accuracy", "qat_accuracy", "onnx_accuracy", "agreement"):
        assert results[key] * 64 == round(results[key] * 64), (key, results[key])
    gap = abs(results["onnx_accuracy"] - results["qat_accuracy"])
    assert gap <= 1 - results["agreement"] + 1e-9
    assert Path(results["export_paths"]["onnx"]).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["test_samples"] == 64
