"""The report of experiments/pareto.py: mixed minus uniform per size, the plot, the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WIDTHS = (2, 3, 4, 8)


def compare(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per mode and uniform width: mixed top-1 minus uniform top-1 at the same size budget."""
    table: dict[str, list[dict[str, Any]]] = {}
    for mode in ("ptq", "qat"):
        rows = []
        for width in WIDTHS:
            pick = {p["kind"]: p for p in points if (p["mode"], p["width"]) == (mode, width)}
            rows.append(
                {
                    "width": width,
                    "same_config": bool(pick["mixed"].get("same_as_uniform")),
                    "uniform": pick["uniform"]["accuracy"],
                    "mixed": pick["mixed"]["accuracy"],
                    "mixed_minus_uniform": pick["mixed"]["accuracy"] - pick["uniform"]["accuracy"],
                }
            )
        table[mode] = rows
    return table


def plot(pair: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    styles = {
        ("uniform", "ptq"): ("C0", "o", "--"),
        ("uniform", "qat"): ("C0", "o", "-"),
        ("mixed", "ptq"): ("C3", "s", "--"),
        ("mixed", "qat"): ("C3", "s", "-"),
    }
    for (kind, mode), (color, marker, line) in styles.items():
        chosen = sorted(
            (p for p in pair["points"] if (p["kind"], p["mode"]) == (kind, mode)),
            key=lambda p: p["size_bytes"],
        )
        axes.plot(
            [p["size_bytes"] / 1024 for p in chosen],
            [p["accuracy"] for p in chosen],
            marker=marker,
            linestyle=line,
            color=color,
            label=f"{kind} {mode.upper()}",
        )
        if kind == "uniform" and mode == "qat":
            for p in chosen:
                axes.annotate(
                    f"W{p['width']}",
                    (p["size_bytes"] / 1024, p["accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=8,
                )
    axes.axhline(pair["fp32_accuracy"], color="grey", linewidth=0.8, label="fp32")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("weight size (KiB, quantized layers)")
    axes.set_ylabel("test top-1")
    axes.set_title(f"{pair['pair']}: accuracy vs weight size (A8)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def table(pairs: list[dict[str, Any]]) -> str:
    lines = [
        "| pair | width | size (bytes) | uniform PTQ | mixed PTQ | uniform QAT | mixed QAT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pair in pairs:
        for width in WIDTHS:
            cells = {}
            for p in pair["points"]:
                if p["width"] == width:
                    mark = " (=)" if p.get("same_as_uniform") else ""
                    cells[p["kind"], p["mode"]] = f"{p['accuracy']:.4f}{mark}"
            size = next(
                p["size_bytes"]
                for p in pair["points"]
                if (p["kind"], p["width"]) == ("uniform", width)
            )
            lines.append(
                f"| {pair['pair']} | W{width} | {size:.0f} | {cells['uniform', 'ptq']} "
                f"| {cells['mixed', 'ptq']} | {cells['uniform', 'qat']} "
                f"| {cells['mixed', 'qat']} |"
            )
        lines.append(
            f"| {pair['pair']} | fp32 | {pair['fp32_weight_bytes']} "
            f"| {pair['fp32_accuracy']:.4f} | | | |"
        )
    return "\n".join(lines)
