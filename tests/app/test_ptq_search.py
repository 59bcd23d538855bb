"""PTQ in the app (``qat_epochs=0``, ``ptq_accuracy`` in every results.json) and
``search=mixed_precision``."""

from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from app_helpers import TINY, compose_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning.analysis import LayerSensitivity, SensitivityResult
from qat_lightning.app.ptq import PTQAccuracy
from qat_lightning.app.report import collect, markdown
from qat_lightning.app.search import log_sensitivity_wandb
from qat_lightning.app.train import train
from qat_lightning.app.validation import ConfigError, validate
from qat_lightning.callback import QATCallback
from qat_lightning.quant import Quantizer

BASE = [o for o in TINY if not o.startswith("qat_epochs=")]


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()), batch_size=16)


def _accuracy(module: nn.Module, loader: DataLoader) -> float:
    module.eval()
    with torch.no_grad():
        hits = sum(int((module(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def _fit(ptq: PTQAccuracy, root) -> tuple[_Tiny, dict[str, torch.Tensor]]:
    module = _Tiny()
    start = copy.deepcopy(module.state_dict())
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=root,
        callbacks=[QATCallback(calibration_batches=2, export_formats=()), ptq],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, _loader())
    return module, start


def test_ptq_accuracy_is_the_calibrated_model_before_any_step(tmp_path) -> None:
    ptq = PTQAccuracy(_loader(), stop=True)
    module, start = _fit(ptq, tmp_path)
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    assert quantizers and all(q.is_initialized for q in quantizers)  # calibrated first
    state = module.state_dict()
    for key, value in start.items():  # no optimizer step ran
        assert torch.equal(state[key], value), key
    assert ptq.accuracy == _accuracy(module, _loader())


def test_ptq_accuracy_does_not_stop_a_qat_run(tmp_path) -> None:
    ptq = PTQAccuracy(_loader())
    module, start = _fit(ptq, tmp_path)
    assert not torch.equal(module.state_dict()["model.1.weight"], start["model.1.weight"])
    assert ptq.accuracy is not None


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("qat_epochs=-1", r"qat_epochs=-1 is invalid: allowed an integer >= 0"),
        ("search.name=greedy", r"search.name=greedy is invalid: allowed one of none, mixed"),
        (
            "search.size_budget=0",
            r"search.size_budget=0.0 is invalid: allowed a fraction of fp32 in \(0, 1\]",
        ),
        ("search.bits=[1,4]", r"search.bits=\[1, 4\] is invalid: allowed a non-empty list"),
        (
            "search.activation_budget=-2",
            r"search.activation_budget=-2.0 is invalid: allowed null, a fraction of fp32",
        ),
    ],
)
def test_bad_search_and_ptq_values_fail_before_training(override, match) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(compose_config([override]))


def test_report_shows_ptq_next_to_qat(tmp_path) -> None:
    for job, (ptq, qat) in enumerate([(0.5, 0.75), (0.25, 0.625)]):
        (tmp_path / str(job)).mkdir()
        results = {"ptq_accuracy": ptq, "qat_accuracy": qat, "config": {}, "sizes": {}}
        (tmp_path / str(job) / "results.json").write_text(json.dumps(results))
    rows, _ = collect(tmp_path)
    assert [(r["ptq_accuracy"], r["qat_accuracy"]) for r in rows] == [(0.5, 0.75), (0.25, 0.625)]
    header, _, first, _ = markdown(rows).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[columns.index("ptq_accuracy")] == "0.5000"
    assert columns.index("ptq_accuracy") + 1 == columns.index("qat_accuracy")


def test_the_sensitivity_table_goes_to_wandb_as_a_table() -> None:
    import wandb

    logged: list[dict] = []
    logger = SimpleNamespace(experiment=SimpleNamespace(log=logged.append))
    entries = [LayerSensitivity("model.0", "params", b, 10.0 * b, 0.5, -0.1 / b) for b in (2, 8)]
    log_sensitivity_wandb(logger, SensitivityResult(entries, 0.6, {"model.0": 10}, (2, 8)))
    table = logged[0]["search/sensitivity"]
    assert isinstance(table, wandb.Table)
    assert table.columns[:3] == ["layer", "side", "bits"]
    assert [row[2] for row in table.data] == [2, 8]


@pytest.mark.slow
def test_qat_epochs_0_is_ptq_calibrated_evaluated_and_exported(tmp_path) -> None:
    results = train(
        compose_config([*BASE, "qat_epochs=0", "fp32_epochs=1", f"output_dir={tmp_path}"])
    )
    assert results["ptq_accuracy"] == results["qat_accuracy"]
    assert results["qat_gain"] is None
    assert results["agreement"] >= 0.9  # the exported ONNX model is the calibrated one
    metrics = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "fp32/train_loss" in metrics and "qat/train_loss" not in metrics


@pytest.mark.slow
def test_mixed_precision_search_chooses_bits_within_the_budget_and_qat_uses_them(
    tmp_path,
) -> None:
    overrides = [
        *BASE,
        "qat_epochs=1",
        "fp32_epochs=1",
        "search=mixed_precision",
        "search.size_budget=0.15",
        "search.calibration_batches=1",
        "search.eval_batches=1",
        f"output_dir={tmp_path}",
    ]
    results = train(compose_config(overrides))
    search = results["search"]
    chosen = search["chosen_bits"]
    assert chosen and all(name.startswith("model.") for name in chosen)
    assert search["size_bytes"] <= 0.15 * search["fp32_bytes"]
    assert results["qat_gain"] == pytest.approx(results["qat_accuracy"] - results["ptq_accuracy"])
    with open(tmp_path / "quant_health.csv") as f:
        rows = {r["quantizer"]: int(r["bits"]) for r in csv.DictReader(f)}
    for name, bits in chosen.items():
        assert rows[f"{name}.param_quantizers.weight"] == bits  # one naming: model.<layer>


@pytest.mark.slow
def test_activation_budget_chooses_activation_bits_that_qat_uses(tmp_path) -> None:
    overrides = [
        *BASE,
        "qat_epochs=1",
        "fp32_epochs=1",
        "search=mixed_precision",
        "search.size_budget=0.5",
        "search.activation_budget=0.2",  # below 8 bits on average: some layers must go lower
        "search.bits=[4,8]",
        "search.calibration_batches=1",
        "search.eval_batches=1",
        f"output_dir={tmp_path}",
    ]
    results = train(compose_config(overrides))
    search = results["search"]
    activation_bits = search["activation_bits"]
    assert activation_bits and set(activation_bits.values()) <= {4, 8}
    assert 4 in activation_bits.values()
    assert search["activation_bytes"] <= search["activation_budget_bytes"]
    with open(tmp_path / "quant_health.csv") as f:
        rows = {r["quantizer"]: int(r["bits"]) for r in csv.DictReader(f)}
    for name, bits in activation_bits.items():  # what QAT ran is what the search chose
        own = [v for k, v in rows.items() if k.startswith(f"{name}.input_quantizers")]
        assert all(v == bits for v in own), (name, bits, own)
