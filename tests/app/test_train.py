"""`train(cfg)` on composed configs with a few batches: what a run leaves behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnx
import pytest
from app_helpers import TINY, compose_config, offline_runs, wandb_records

from qat_lightning.app.train import train


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default_run")
    results = train(compose_config([*TINY, "fp32_epochs=1", f"output_dir={out}"]))
    return out, results


def test_default_config_exports_and_writes_results(default_run):
    out, results = default_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results, default=str))
    for key in ("fp32_accuracy", "qat_accuracy", "onnx_accuracy", "agreement"):
        assert 0.0 <= results[key] <= 1.0, key
    # The exported integer model is what was trained: top-1 agrees on (nearly) every sample.
    assert results["agreement"] >= 0.9
    assert abs(results["onnx_accuracy"] - results["qat_accuracy"]) <= 0.1
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
    assert (out / "checkpoints" / "last.ckpt").is_file()
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "fp32/train_loss" in metrics and "qat/train_loss" in metrics
    with open(out / "quant_health.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == results["health"]["quantizers"] > 0
    assert {"quantizer", "bits", "scale", "clip_rate", "sqnr_db"} <= set(rows[0])


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
