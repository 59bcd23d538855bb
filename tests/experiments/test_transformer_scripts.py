"""`transformer_table.py` and `bench_transformer.py` run end to end on tiny configs and their
JSON says what the table and the tables claim (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _run(script: str, *args: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(line), result.stdout


@pytest.mark.slow
def test_transformer_table_measures_every_column(tmp_path) -> None:
    # two of the table's six (each model's own acceptance test is in tests/export): one
    # with float rows of several kinds (ViT), one through Hugging Face attention (BERT)
    models = ["vit", "bert"]
    figures, stdout = _run(
        "transformer_table.py", "--size", "tiny", "--models", *models, "--batch", "4",
        "--calibration-batches", "1", "--test-batch", "8", "--threads", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert figures["cpu"] and [r["model"] for r in figures["rows"]] == models
    for row in figures["rows"]:
        name = row["model"]
        assert "error" not in row and "export_error" not in row, row
        assert row["convert_equals_eval"] is True, name
        # onnxruntime's argmax agrees with the integer eval (issue 13's bar: >= 99 %)
        assert row["ort_samples"] > 0 and row["ort_agreement"] >= 0.99, name
        assert row["mac_ops"]["integer"] > 0, name
        assert 0 < row["size_ratio"] < 1, name
        assert row["fp32_dynamic_axes"] is True, name  # both files serve the same shapes
        counts = row["counts"]
        assert counts["quantized"] > 0 and counts["float"] == len(row["float_rows"]), name
        assert all(r["note"] for r in row["float_rows"]), name  # every float layer says why
        assert f"| {name} |" in stdout
    for row in figures["rows"]:  # a Linear left float (Swin's qkv/proj today) runs float MACs
        if row["float_types"].get("Linear"):
            assert row["mac_ops"]["float"] > 0, row["model"]


@pytest.mark.slow
def test_bench_transformer_reports_steps_and_latencies(tmp_path) -> None:
    figures, stdout = _run(
        "bench_transformer.py", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup",
        "0", "--runs", "1", "--threads", "1", "--calibration-batches", "1", "--out",
        str(tmp_path),
    )  # fmt: skip
    assert figures["cpu"] and set(figures["models"]) == {"vit", "bert"}
    for name, entry in figures["models"].items():
        steps = entry["train_step"]
        assert set(steps["ratio_over_float"]) == {"float", "qat_lightning", "torch_ao"}, name
        assert all(s > 0 for s in steps["median_step_s"].values()), name
        assert 0 < steps["torch_ao_linears"] <= steps["linears"], name
        results = entry["latency"]["results"]
        labels = {
            "fp32 onnxruntime", "int8 ours", "int8 ours, weights=int8", "int8 quantize_static",
            "int8 quantize_dynamic",
        }  # fmt: skip
        assert set(results) == labels, name
        assert all(r["ms"] > 0 for r in results.values()), name
        # agreement is counted against fp32 onnxruntime's own argmax: 1 by construction there
        assert results["fp32 onnxruntime"]["agreement_with_fp32"] == 1.0, name
        assert results["fp32 onnxruntime"]["mac_ops"]["integer"] == 0, name
        assert results["int8 ours"]["mac_ops"]["integer"] > 0, name
        assert results["int8 ours, weights=int8"]["mac_ops"]["float"] == 0, name
        assert results["int8 ours"]["size_ratio"] < 0.5, name
        assert set(entry["goals_met"]) == {
            "step <= 1.4x float",
            "int8 ours <= best of quantize_static / quantize_dynamic",
        }
        assert f"| {name} | int8 ours |" in stdout


@pytest.mark.slow
def test_profile_qat_step_counts_ops_of_both_sides() -> None:
    figures, stdout = _run(
        "profile_qat_step.py", "--size", "tiny", "--batch", "2", "--rounds", "1", "--top", "3"
    )
    assert figures["cpu"] and figures["ratio_over_float"] > 0
    float_side, ours = figures["profile"]["float"], figures["profile"]["qat_lightning"]
    assert float_side["fake_quant_per_tensor"] == float_side["fake_quant_per_channel"] == 0
    assert ours["fake_quant_per_tensor"] > 0 and ours["fake_quant_per_channel"] > 0
    assert ours["aten_ops"] > float_side["aten_ops"] > 0
    assert len(ours["top_self_cpu"]) == 3 and "| qat_lightning |" in stdout
