"""`train(cfg)` on composed configs with a few batches: what a run leaves behind."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import onnx
import pytest
from app_helpers import TINY, compose_config, offline_runs, wandb_records
from lightning.pytorch.callbacks import Callback

from qat_lightning.app.train import train


class ModesAtTrainStart(Callback):
    """For each fit, the names of the modules in eval mode when training starts."""

    def __init__(self) -> None:
        self.in_eval: list[list[str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.in_eval.append([n for n, m in pl_module.named_modules() if not m.training])


MODES = ModesAtTrainStart()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Two whole float epochs on digits (21 batches each) and one QAT epoch: enough to learn
    the task, so accuracy can be asserted well above chance (0.1)."""
    out = tmp_path_factory.mktemp("default_run")
    overrides = [*TINY, "trainer.limit_train_batches=null", "fp32_epochs=2"]
    results = train(compose_config([*overrides, f"output_dir={out}"]), callbacks=[MODES])
    return out, results


def test_both_phases_train_in_train_mode(default_run):
    # The float phase's test accuracy is measured in eval mode; QAT must not then train (and
    # calibrate) with BatchNorm on its running statistics.
    assert MODES.in_eval == [[], []]


def test_default_config_learns_exports_and_writes_results(default_run):
    out, results = default_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results, default=str))
    assert on_disk["status"] == "completed" and on_disk["epochs"] == {"fp32": 2, "qat": 1}
    assert results["fp32_accuracy"] >= 0.6 and results["qat_accuracy"] >= 0.6  # chance: 0.1
    # The exported integer model is what was trained: README promises exact agreement.
    assert results["agreement"] == 1.0
    assert results["onnx_accuracy"] == results["qat_accuracy"]
    onnx_path = Path(results["export_paths"]["onnx"])
    assert onnx_path.parent.parent == out and onnx_path.is_file()
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert Path(results["export_paths"]["native"]).is_dir()
    sizes = results["sizes"]
    assert sizes["onnx_bytes"] == onnx_path.stat().st_size
    assert sizes["onnx_weights_bytes"] < sizes["fp32_bytes"] / 2  # int8 weights: about 1/4
    assert results["config"]["quant"]["params"]["bits"] == 8
    assert results["config"]["model"]["name"] == "cnn"
    assert results["test_samples"] == 64 and results["wall_time_s"] > 0


def test_run_directory_holds_checkpoints_logs_and_health(default_run):
    out, results = default_run
    assert (out / "checkpoints" / "fp32.pt").is_file()
    for phase in ("fp32", "qat"):
        assert (out / "checkpoints" / phase / "last.ckpt").is_file()
        assert results["checkpoints"][phase] == str(out / "checkpoints" / phase / "last.ckpt")
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "fp32/train_loss" in metrics and "qat/train_loss" in metrics
    assert "qat/val_acc" in metrics and "fp32/train_acc_epoch" in metrics
    with open(out / "quant_health.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == results["health"]["quantizers"] > 0
    assert {"quantizer", "bits", "scale", "clip_rate", "sqnr_db"} <= set(rows[0])
    # quantizers are named from the LightningModule, as quant.overrides and quant.skip name
    # layers (model.<layer>), and as the quantization report's table names them
    table = (out / "logs" / "qat_report.txt").read_text().splitlines()[2:-1]
    layers = {line.split()[0] for line in table}
    for row in rows:
        layer = re.sub(r"\.(input|output|param)_quantizers\..*$", "", row["quantizer"])
        assert layer.startswith("model.") and layer in layers, row["quantizer"]


@pytest.mark.slow
def test_init_from_a_float_checkpoint_starts_qat_from_it(default_run, tmp_path):
    out, first = default_run
    cfg = compose_config(
        [
            *TINY,
            "fp32_epochs=0",
            f"init_from={out / 'checkpoints' / 'fp32.pt'}",
            f"output_dir={tmp_path}",
        ]
    )
    results = train(cfg)
    assert results["fp32_accuracy"] == first["fp32_accuracy"]  # same weights, same test set


@pytest.mark.slow
def test_wandb_offline_run_holds_config_history_health_and_model(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    cfg = compose_config(
        [
            *TINY,
            "fp32_epochs=0",
            "logger=wandb",
            "quant.params.bits=4",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    results = train(cfg)
    import wandb

    wandb.teardown()  # the wandb service writes the run file asynchronously; wait for it
    (run_file,) = offline_runs(wandb_dir)
    records = list(wandb_records(run_file))
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["quant"]["params"]["bits"] == 4 and config["model"]["name"] == "cnn"
    history = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert {"qat/train_loss", "trainer/global_step"} <= history
    # the per-layer table, its SQNR bar plot and histograms (nested keys of wandb media)
    assert {"quant/health/_type", "quant/sqnr_db_hist/_type"} <= history
    assert any(k.startswith("quant/sqnr_by_quantizer") for k in history)
    assert any(k.startswith("quant/model.") and k.endswith("/sqnr_db") for k in history)
    artifacts = {
        r.artifact.name: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
    }
    (model,) = [a for name, a in artifacts.items() if name.startswith("qat-model-")]
    assert model.type == "model"
    files = {entry.path for entry in model.manifest.contents}
    assert {"model_int.onnx", "native/encodings.json", "native/model.safetensors"} <= files
    tables = list(run_file.parent.glob("files/media/table/quant/health*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert "sqnr_db" in table["columns"] and len(table["data"]) == results["health"]["quantizers"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:export_onnx.*left float")  # the transformer's LayerNorms
@pytest.mark.parametrize("model", ["resnet20", "transformer"])
def test_models_written_here_train_export_and_run_in_onnxruntime(model, tmp_path):
    overrides = ["fp32_epochs=0", f"model={model}", "callbacks.checkpoint=false"]
    cfg = compose_config([*TINY, *overrides, f"output_dir={tmp_path}"])
    results = train(cfg)
    assert results["onnx_accuracy"] is not None
    assert results["quantization"]["counts"]["quantized"] > 0
    assert results["sizes"]["onnx_weights_bytes"] < results["sizes"]["fp32_bytes"] / 2
