"""qat-report on hand-written results.json files: columns, rounding, legend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from qat_lightning.app.report import collect, plot, report


def _write_job(sweep: Path, job: int, params_bits: int, **results) -> None:
    directory = sweep / str(job)
    directory.mkdir(parents=True)
    quant = {"inputs": {"bits": 8}, "params": {"bits": params_bits}}
    results |= {"config": {"quant": quant}, "sizes": {"fp32_bytes": 4096, "onnx_bytes": 2048}}
    (directory / "results.json").write_text(json.dumps(results))


def _sweep(tmp_path: Path, onnx_equals_qat: bool = True, ptq: bool = False) -> Path:
    for job, (bits, qat) in enumerate([(4, 0.912345678), (8, 0.9555555)]):
        extra = {"ptq_accuracy": qat - 0.1} if ptq else {}
        _write_job(
            tmp_path,
            job,
            bits,
            fp32_accuracy=0.961111,
            qat_accuracy=qat,
            onnx_accuracy=qat if onnx_equals_qat else qat - 0.01,
            agreement=0.99722222,
            test_samples=360,
            **extra,
        )
    return tmp_path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_delta_vs_fp32_and_test_size_columns_with_rounded_csv(tmp_path) -> None:
    paths = report(_sweep(tmp_path))
    rows = _csv(paths["csv"])
    assert [r["delta_vs_fp32"] for r in rows] == ["-0.0488", "-0.0056"]
    assert [r["qat_accuracy"] for r in rows] == ["0.9123", "0.9556"]
    assert {r["agreement"] for r in rows} == {"0.9972"} and {r["test_samples"] for r in rows} == {
        "360"
    }
    table = paths["markdown"].read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    first = dict(zip(header, (c.strip() for c in table[2].strip("|").split("|")), strict=True))
    assert first["delta_vs_fp32"] == "-0.0488" and first["test_samples"] == "360"
    assert first["qat_accuracy"] == "0.9123"


def test_the_ptq_column_appears_only_when_some_job_measured_it(tmp_path) -> None:
    without = report(_sweep(tmp_path / "a"))
    assert "ptq_accuracy" not in _csv(without["csv"])[0]
    assert "ptq_accuracy" not in without["markdown"].read_text()
    with_ptq = report(_sweep(tmp_path / "b", ptq=True))
    assert [r["ptq_accuracy"] for r in _csv(with_ptq["csv"])] == ["0.8123", "0.8556"]
    assert "| ptq_accuracy |" in with_ptq["markdown"].read_text()


def _accuracy_legend(rows, path) -> list[str]:
    return [t.get_text() for t in plot(rows, path).axes[0].get_legend().get_texts()]


def test_the_legend_says_qat_equals_onnx_once_when_they_agree(tmp_path) -> None:
    rows, _ = collect(_sweep(tmp_path / "same"))
    assert _accuracy_legend(rows, tmp_path / "same.png") == ["QAT = ONNX, A8", "fp32"]
    rows, _ = collect(_sweep(tmp_path / "differ", onnx_equals_qat=False, ptq=True))
    assert _accuracy_legend(rows, tmp_path / "differ.png") == [
        "PTQ, A8",
        "QAT model (eval), A8",
        "ONNX, A8",
        "fp32",
    ]
    assert "360 test samples" in plot(rows, tmp_path / "t.png").axes[0].get_title()
