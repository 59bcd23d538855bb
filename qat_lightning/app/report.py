"""`qat-report <multirun dir>`: one table and one plot for a sweep.

Reads every job's ``results.json`` under the directory and writes, next to them:

- ``summary.csv``: one row per job (bitwidths, test-set size, accuracies, the QAT model's
  change against fp32, agreement, sizes, and the overrides that tell the jobs apart);
  accuracies rounded to 4 decimals;
- ``summary.md``: the same as a markdown table (also printed);
- ``summary.png``: accuracy vs weight bitwidth and model size vs weight bitwidth, one line per
  activation bitwidth.

Accuracies: ``fp32`` the float model, ``ptq`` the post-training-quantized one (a column only when
some job measured it), ``qat`` the QAT model in integer eval, ``onnx`` the exported file in
onnxruntime, all on the same ``test_samples`` images; ``delta_vs_fp32`` is ``qat - fp32``. When
QAT and ONNX accuracy are equal in every job the plot draws them as one line, "QAT = ONNX".

Sizes: ``fp32`` is the float model's state_dict; ``onnx`` the exported file, ``onnx_weights``
its initializers alone (the file also holds the graph and exporter metadata); ``native`` the
safetensors + encodings directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "job",
    "model",
    "data",
    "inputs_bits",
    "params_bits",
    "test_samples",
    "fp32_accuracy",
    "ptq_accuracy",
    "qat_accuracy",
    "delta_vs_fp32",
    "onnx_accuracy",
    "agreement",
    "fp32_kib",
    "onnx_kib",
    "onnx_weights_kib",
    "native_kib",
    "wall_time_s",
    "overrides",
)
ACCURACIES = ("fp32_accuracy", "ptq_accuracy", "qat_accuracy", "onnx_accuracy", "agreement")
# Shown only when some job has a value (added by newer qat-train versions).
OPTIONAL = ("ptq_accuracy",)


def _job_key(path: Path) -> tuple:
    name = path.parent.name
    return (0, int(name), "") if name.isdigit() else (1, 0, str(path))


def collect(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """One row per ``results.json`` under ``sweep_dir``; also the job dirs that have none."""
    rows = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_job_key):
        results = json.loads(path.read_text())
        config, sizes = results.get("config", {}), results.get("sizes", {})
        quant = config.get("quant", {})

        def kib(key: str, sizes: dict = sizes) -> float | None:
            return round(sizes[key] / 1024, 1) if sizes.get(key) is not None else None

        fp32, qat = results.get("fp32_accuracy"), results.get("qat_accuracy")
        rows.append(
            {
                "job": str(path.parent.relative_to(sweep_dir)) or ".",
                "model": config.get("model", {}).get("name"),
                "data": config.get("data", {}).get("name"),
                "inputs_bits": (quant.get("inputs") or {}).get("bits"),
                "params_bits": quant.get("params", {}).get("bits"),
                "test_samples": results.get("test_samples"),
                **{key: results.get(key) for key in ACCURACIES},
                "delta_vs_fp32": None if fp32 is None or qat is None else qat - fp32,
                "fp32_kib": kib("fp32_bytes"),
                "onnx_kib": kib("onnx_bytes"),
                "onnx_weights_kib": kib("onnx_weights_bytes"),
                "native_kib": kib("native_bytes"),
                "wall_time_s": results.get("wall_time_s"),
                "overrides": list(results.get("overrides", [])),
            }
        )
    # Overrides every job shares (the sweep's fixed settings) say nothing about a row.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if o not in shared)
    # Hydra writes .hydra/ into every job dir it starts: those without results failed.
    done = {sweep_dir / r["job"] for r in rows}
    failed = sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.parent not in done)
    return rows, failed


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """`COLUMNS`, less the optional ones no row has a value for."""
    return [c for c in COLUMNS if c not in OPTIONAL or any(r.get(c) is not None for r in rows)]


def _rounded(row: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The CSV row: accuracies and their difference to 4 decimals, times to 0.1 s."""
    out = {}
    for name in names:
        value = row.get(name)
        if isinstance(value, float) and (name in ACCURACIES or name == "delta_vs_fp32"):
            value = round(value, 4)
        elif isinstance(value, float) and name == "wall_time_s":
            value = round(value, 1)
        out[name] = value
    return out


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "delta_vs_fp32":
        return f"{value:+.4f}"
    if name in ACCURACIES:
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub markdown table of the rows."""
    names = columns(rows)
    lines = [
        "| " + " | ".join(names) + " |",
        "| " + " | ".join("---" for _ in names) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _accuracy_lines(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(key, style, label) of the accuracy lines: QAT and ONNX as one line where they agree
    in every job (two labels on one line say nothing the one does not)."""
    lines = [("ptq_accuracy", "v-.", "PTQ")]
    pairs = [(r["qat_accuracy"], r["onnx_accuracy"]) for r in rows]
    if pairs and all(q is not None and q == o for q, o in pairs):
        return [*lines, ("qat_accuracy", "o-", "QAT = ONNX")]
    return [*lines, ("qat_accuracy", "o-", "QAT model (eval)"), ("onnx_accuracy", "s--", "ONNX")]


def plot(rows: list[dict[str, Any]], path: Path) -> Any:
    """Accuracy and size vs weight bits, a line per activation bitwidth (matplotlib, Agg).

    Returns:
        The (closed) matplotlib figure written to ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, size_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_inputs: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        if row["params_bits"] is not None:
            by_inputs.setdefault(row["inputs_bits"], []).append(row)
    for inputs_bits, group in sorted(by_inputs.items(), key=lambda kv: str(kv[0])):
        group = sorted(group, key=lambda r: r["params_bits"])
        bits = [r["params_bits"] for r in group]
        for key, style, label in _accuracy_lines(rows):
            values = [r[key] for r in group]
            if any(v is not None for v in values):
                acc_ax.plot(bits, values, style, label=f"{label}, A{inputs_bits}")
        for key, style, label in (
            ("onnx_kib", "s--", "ONNX file"),
            ("onnx_weights_kib", "^:", "ONNX initializers"),
            ("native_kib", "o-", "native"),
        ):
            values = [r[key] for r in group]
            if any(v is not None for v in values):
                size_ax.plot(bits, values, style, label=f"{label}, A{inputs_bits}")
    fp32 = [r["fp32_accuracy"] for r in rows if r["fp32_accuracy"] is not None]
    if fp32:
        acc_ax.axhline(sum(fp32) / len(fp32), color="grey", linestyle=":", label="fp32")
    fp32_size = [r["fp32_kib"] for r in rows if r["fp32_kib"] is not None]
    if fp32_size:
        size_ax.axhline(fp32_size[0], color="grey", linestyle=":", label="fp32 weights")
    all_bits = sorted({r["params_bits"] for r in rows if r["params_bits"] is not None})
    sizes = sorted({r["test_samples"] for r in rows if r["test_samples"] is not None})
    n = f" ({', '.join(map(str, sizes))} test samples)" if sizes else ""
    for ax, title, ylabel in (
        (acc_ax, f"Test accuracy vs weight bitwidth{n}", "top-1 accuracy"),
        (size_ax, "Model size vs weight bitwidth", "KiB"),
    ):
        ax.set_title(title)
        ax.set_xlabel("weight bits (quant.params.bits)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(all_bits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md and summary.png for the sweep; returns their paths.

    Raises:
        FileNotFoundError: no ``results.json`` under ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    rows, failed = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(
            f"{sweep_dir} holds no results.json: allowed a qat-train run or multirun directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "summary.csv", "markdown": out / "summary.md", "png": out / "summary.png"}
    with open(paths["csv"], "w", newline="") as f:
        names = columns(rows)
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(_rounded(row, names) for row in rows)
    text = markdown(rows)
    if failed:
        text += f"\n{len(failed)} job(s) without results.json: {', '.join(map(str, failed))}\n"
    paths["markdown"].write_text(text)
    plot(rows, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="qat-report", description="Summarise a qat-train sweep: CSV, markdown table, plot."
    )
    parser.add_argument(
        "sweep_dir", help="a multirun directory (e.g. multirun/2025-01-01/12-00-00)"
    )
    parser.add_argument("--out", help="where to write the summary (default: the sweep directory)")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"qat-report: error: {args.sweep_dir} is not a directory", file=sys.stderr)
        sys.exit(2)
    try:
        paths = report(args.sweep_dir, args.out)
    except FileNotFoundError as err:
        print(f"qat-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(paths["markdown"].read_text(), end="")
    print(f"\nwrote {paths['csv']}, {paths['markdown']}, {paths['png']}")


if __name__ == "__main__":
    main()
