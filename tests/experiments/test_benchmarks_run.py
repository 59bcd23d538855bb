"""The benchmark scripts run end to end on tiny sizes and print the figures they promise.

Timing is not asserted here (that is what the benchmarks are for); these only keep the scripts
from rotting as the package changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat_lightning.app.models import ResNetCifar

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def is_count(accuracy: float, n: int) -> bool:
    """An accuracy over ``n`` samples: k / n for an integer k in 0..n."""
    k = accuracy * n
    return 0 <= round(k) <= n and abs(k - round(k)) < 1e-6


def last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_bench_fake_quant_reports_ratios():
    figures = last_json_line(run("bench_fake_quant.py", "--quick", "--repeats", "2"))
    assert figures["cases"] and all(c["ratio"] > 0 for c in figures["cases"].values())


@pytest.mark.slow
def test_bench_qat_step_reports_ratios_memory_and_missing_peers():
    # ModelOpt is no dependency of ours (torchao now is, in the dev extra): without --peer-dir
    # it must be listed with its error, not crash the benchmark nor vanish from the table.
    stdout = run(
        "bench_qat_step.py", "--steps", "1", "--warmup", "0", "--batch", "4",
        "--peers", "modelopt", "--memory", "--clock", "cpu", "--ops",
    )  # fmt: skip
    figures = last_json_line(stdout)
    assert set(figures["ratio_over_float"]) == {"qat_lightning", "torch_ao"}
    assert set(figures["min_ratio_over_float"]) == {"qat_lightning", "torch_ao"}
    ops = figures["aten_ops_per_step"]
    assert set(ops) == {"float", "qat_lightning", "torch_ao"}
    assert all(side["total"] > 0 for side in ops.values())
    evals = {"float", "qat_lightning_fake_quant", "qat_lightning_integer"}
    assert set(figures["eval_ratio_over_float"]) == evals
    assert "ModuleNotFoundError" in figures["peer_errors"]["modelopt"]
    assert "| modelopt | failed: ModuleNotFoundError" in stdout
    memory = figures["step_memory"]
    assert set(memory) == {"float", "qat_lightning", "torch_ao"}
    assert all(side["step_peak_mib"] > 0 for side in memory.values())
    # QAT keeps more for backward than float does (masks, fake-quantized inputs), never less
    saved = {side: memory[side]["saved_for_backward_mib"] for side in memory}
    assert saved["float"] > 0 and saved["qat_lightning"] > saved["float"], saved
    assert figures["cpu"]


@pytest.mark.slow
def test_bench_export_reports_latencies_and_sizes():
    stdout = run(
        "bench_export.py",
        "--size",
        "64",
        "--batch",
        "2",
        "--runs",
        "2",
        "--calibration-batches",
        "1",
    )
    assert "int8 ours (onnxruntime)" in stdout and "quantize_static" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("brevitas", [False, True], ids=["ours+torch_ao", "brevitas"])
def test_peer_qat_reports_every_side(tmp_path, brevitas):
    """Random images (--synthetic), so it needs no data set; one thread, so other jobs on the
    machine do not stall it."""
    brevitas_path = os.environ.get("QAT_BREVITAS_PATH")
    if brevitas and not brevitas_path:
        pytest.skip("QAT_BREVITAS_PATH (a `pip install --target` dir of brevitas) is not set")
    fp32 = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(ResNetCifar(in_channels=3, num_classes=10).state_dict(), fp32)
    args = ["--quick", "--synthetic", "--threads", "1", "--fp32", str(fp32)]
    args += ["--out", str(tmp_path / "out")]
    figures = last_json_line(
        run("peer_qat.py", *args, *(["--brevitas-path", brevitas_path] if brevitas else []))
    )
    sides = {"qat_lightning", "torch_ao"} | ({"brevitas"} if brevitas else set())
    assert set(figures["sides"]) == sides, figures["errors"]
    n = figures["setup"]["test_samples"]
    assert n > 0 and is_count(figures["fp32_accuracy"], n)
    for side, result in figures["sides"].items():
        assert is_count(result["fake_quant_accuracy"], n), side
        assert is_count(result["exported_accuracy"], n), side
        # a sample whose top-1 agrees is right or wrong in both: accuracies differ by at most
        # the share of samples that disagree
        gap = abs(result["exported_accuracy"] - result["fake_quant_accuracy"])
        assert gap <= 1 - result["agreement"] + 1e-9, side
        weights = result["exported_weight_bytes"]  # None: torch_ao's state_dict has no graph
        assert result["exported_bytes"] > 0 and (weights is None) == (side == "torch_ao"), side
    # our integer ONNX model predicts what the fake-quant model predicts
    assert figures["sides"]["qat_lightning"]["agreement"] >= 0.9
    # int8 weights: about a quarter of the float model's bytes
    ours = figures["sides"]["qat_lightning"]
    assert ours["exported_weight_bytes"] < figures["fp32_bytes"] / 2
    assert set(figures["step_ratio_over_float"]) == {"float"} | sides
    assert set(figures["latency_ms"]) == {"batch_1", "batch_32"}
    assert all(set(ms) == {"float"} | sides for ms in figures["latency_ms"].values())


CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-partial"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_dir(), reason="no shared CIFAR-10 subset (../shared/data)")
def test_calibration_ablation_reports_each_observer(tmp_path):
    fp32 = tmp_path / "fp32.pt"
    torch.manual_seed(0)
    torch.save(ResNetCifar(in_channels=3, num_classes=10).state_dict(), fp32)
    args = ["--fp32", str(fp32), "--data-root", str(CIFAR), "--max-test", "64"]
    figures = last_json_line(run("calibration_ablation.py", *args, "--calibration-batches", "1"))
    assert [r["observer"] for r in figures["rows"]] == ["fp32", "minmax", "percentile", "mse"]
    assert figures["test_samples"] == 64
    assert all(is_count(r["accuracy"], 64) for r in figures["rows"])
    assert all(r["seconds"] >= 0 for r in figures["rows"][1:])
