"""The benchmark scripts run end to end on tiny sizes and print the figures they promise.

Timing is not asserted here (that is what the benchmarks are for); these only keep the scripts
from rotting as the package changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_bench_fake_quant_reports_ratios():
    figures = last_json_line(run("bench_fake_quant.py", "--quick", "--repeats", "2"))
    assert figures["cases"] and all(c["ratio"] > 0 for c in figures["cases"].values())


@pytest.mark.slow
def test_bench_qat_step_reports_both_ratios():
    figures = last_json_line(
        run("bench_qat_step.py", "--steps", "1", "--warmup", "0", "--batch", "4")
    )
    assert set(figures["ratio_over_float"]) == {"qat_lightning", "torch_ao"}


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
