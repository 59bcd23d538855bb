"""experiments/pareto.py --smoke: every point of the Pareto comparison, on scikit-learn digits.

The smoke mode runs the whole pipeline (float training, sensitivity, mixed-precision choice,
PTQ with `calibrate`, QAT with `QATCallback` on a Trainer) at tiny step counts, in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "pareto.py"
WIDTHS = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("pareto")
    cwd = tmp_path_factory.mktemp("cwd")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # everything it writes goes under --out
    return json.loads((out / "results.json").read_text()), result.stdout, out


@pytest.mark.slow
def test_every_point_is_there_and_mixed_meets_its_budget(smoke) -> None:
    summary, _, _ = smoke
    (pair,) = summary["pairs"]
    points = pair["points"]
    keys = [(p["kind"], p["mode"], p["width"]) for p in points]
    expected = {(k, m, w) for k in ("uniform", "mixed") for m in ("ptq", "qat") for w in WIDTHS}
    assert sorted(keys) == sorted(expected)  # each exactly once
    numel = pair["sensitivity"]["weight_numel"]
    total = sum(numel.values())
    assert pair["fp32_weight_bytes"] == 4 * total
    for p in points:
        budget = total * p["width"] / 8
        if p["kind"] == "uniform":
            assert p["size_bytes"] == budget and p["bits"] == [p["width"]]
            continue
        # the chosen bits, applied to the model, give the size it reports, within the budget
        chosen = p["chosen_bits"]
        assert set(chosen) == set(numel)
        assert p["size_bytes"] == sum(numel[n] * b for n, b in chosen.items()) / 8
        assert p["size_bytes"] <= budget
        assert p["bits"] == sorted(set(chosen.values()))
        if p.get("same_as_uniform"):
            assert set(chosen.values()) == {p["width"]}
    # every layer at 2 bits is the only choice within the W2 budget
    assert all(p.get("same_as_uniform") for p in points if (p["kind"], p["width"]) == ("mixed", 2))


@pytest.mark.slow
def test_accuracies_are_counts_and_8_bit_ptq_keeps_the_float_accuracy(smoke) -> None:
    summary, _, _ = smoke
    (pair,) = summary["pairs"]
    n = pair["test_samples"]
    for p in pair["points"]:
        k = p["accuracy"] * n
        assert abs(k - round(k)) < 1e-3, p
    uniform8 = next(
        p for p in pair["points"] if (p["kind"], p["mode"], p["width"]) == ("uniform", "ptq", 8)
    )
    assert pair["fp32_accuracy"] > 0.3  # the float model learned something (10 classes)
    assert abs(uniform8["accuracy"] - pair["fp32_accuracy"]) <= 0.05
    uniform2 = next(
        p for p in pair["points"] if (p["kind"], p["mode"], p["width"]) == ("uniform", "ptq", 2)
    )
    assert uniform2["accuracy"] < uniform8["accuracy"]  # 2-bit weights with no training hurt
    comparison = pair["comparison"]
    for mode in ("ptq", "qat"):
        assert [row["width"] for row in comparison[mode]] == list(WIDTHS)


@pytest.mark.slow
def test_prints_the_cpu_a_table_and_writes_the_plot(smoke) -> None:
    summary, stdout, out = smoke
    assert stdout.startswith("CPU: ") and summary["cpu"] in stdout.splitlines()[0]
    assert "| digits-cnn | W4 |" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["pairs"][0]["pair"] == "digits-cnn"
    png = out / "digits-cnn.png"
    assert summary["pairs"][0]["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_missing_data_directory_is_one_clear_error(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--pairs",
            "fashion_mnist-cnn",
            "--fashion-root",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr
