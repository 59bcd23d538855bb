"""`SensitivityResult`: what quantizing each layer alone does to a model, as a table and a plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SIDES = ("params", "inputs")


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer, one side (weights or activations), one bit width, everything else float.

    Attributes:
        name: qualified module name in the quantized model (a fused Conv+BN has the conv's).
        side: ``"params"`` (the layer's weights quantized) or ``"inputs"`` (its activation
            quantizers: the inputs it quantizes itself and its output).
        bits: the bit width of that side.
        sqnr_db: SQNR of the model's output against the float model's, over the batches
            (``inf`` where the output did not change).
        metric: the metric of the model with only this quantized (None without a metric).
        delta: ``metric - baseline`` (negative: the metric fell); None without a metric.
    """

    name: str
    side: str
    bits: int
    sqnr_db: float
    metric: float | None = None
    delta: float | None = None

    @property
    def noise_ratio(self) -> float:
        """Output noise power over signal power, ``10 ** (-sqnr_db / 10)``."""
        return 0.0 if math.isinf(self.sqnr_db) else 10 ** (-self.sqnr_db / 10)


@dataclass
class SensitivityResult:
    """The result of `sensitivity`: one `LayerSensitivity` per layer, side and bit width.

    Attributes:
        entries: in module order, then side, then bit width.
        baseline: the float model's metric (None without a metric).
        weight_numel: per layer, the number of weight elements its param quantizers cover
            (what a weight bit width multiplies into a size).
        bits: the bit widths measured.
        which: the sides measured.
        activation_numel: per layer, the activation elements one sample puts through its
            activation quantizers (the ``"inputs"`` side; what an activation bit width
            multiplies into bytes per sample), counted on the first batch.
    """

    entries: list[LayerSensitivity]
    baseline: float | None
    weight_numel: dict[str, int] = field(default_factory=dict)
    bits: tuple[int, ...] = ()
    which: tuple[str, ...] = ()
    activation_numel: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Layer names in module order."""
        return list(dict.fromkeys(e.name for e in self.entries))

    def get(self, name: str, side: str, bits: int) -> LayerSensitivity:
        """The entry of ``name`` / ``side`` / ``bits`` (KeyError if it was not measured)."""
        for entry in self.entries:
            if (entry.name, entry.side, entry.bits) == (name, side, bits):
                return entry
        raise KeyError(f"no sensitivity measured for {name!r} {side} at {bits} bits")

    def cost(self, name: str, side: str, bits: int) -> float:
        """How much quantizing ``name``'s ``side`` to ``bits`` hurts (lower is better): the
        metric's drop where there is a metric, else the output noise ratio (noise powers of
        independent layers add, so summed costs estimate the whole model's)."""
        entry = self.get(name, side, bits)
        return -entry.delta if entry.delta is not None else entry.noise_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (an ``inf`` SQNR becomes None)."""

        def row(e: LayerSensitivity) -> dict[str, Any]:
            values = asdict(e)
            values["sqnr_db"] = None if math.isinf(e.sqnr_db) else e.sqnr_db
            return values

        return {
            "baseline": self.baseline,
            "bits": list(self.bits),
            "which": list(self.which),
            "weight_numel": dict(self.weight_numel),
            "activation_numel": dict(self.activation_numel),
            "entries": [row(e) for e in self.entries],
        }

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows, one row per entry (for a wandb or CSV table)."""
        columns = ["layer", "side", "bits", "sqnr_db", "metric", "delta"]
        rows = [[e.name, e.side, e.bits, e.sqnr_db, e.metric, e.delta] for e in self.entries]
        return columns, rows

    def __str__(self) -> str:
        has_metric = self.baseline is not None
        header = ["layer", "side"] + [
            f"{b}b {'delta' if has_metric else 'SQNR dB'}" for b in self.bits
        ]
        table = [header]
        for name in self.layers:
            for side in self.which:
                cells = []
                for bits in self.bits:
                    try:
                        e = self.get(name, side, bits)
                    except KeyError:
                        cells.append("-")
                        continue
                    cells.append(f"{e.delta:+.4f}" if has_metric else f"{e.sqnr_db:.1f}")
                if any(c != "-" for c in cells):
                    table.append([name, side, *cells])
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
        lines.insert(1, "-" * len(lines[0]))
        if has_metric:
            lines.append(
                f"float metric: {self.baseline:.4f}; delta = metric with one layer "
                "quantized - float metric"
            )
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart: per layer, one bar per bit width (metric delta, or SQNR without a
        metric), one panel per side. Returns the path written."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        layers = self.layers
        has_metric = self.baseline is not None
        figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 3.2 * len(self.which)))
        FigureCanvasAgg(figure)
        width = 0.8 / max(1, len(self.bits))
        for row, side in enumerate(self.which):
            axes = figure.add_subplot(len(self.which), 1, row + 1)
            for i, bits in enumerate(self.bits):
                xs, ys = [], []
                for j, name in enumerate(layers):
                    try:
                        e = self.get(name, side, bits)
                    except KeyError:
                        continue
                    value = e.delta if has_metric else e.sqnr_db
                    if value is not None and math.isfinite(value):
                        xs.append(j + (i - (len(self.bits) - 1) / 2) * width)
                        ys.append(value)
                axes.bar(xs, ys, width=width, label=f"{bits} bits")
            axes.set_title(f"{side}: one layer quantized, the rest float")
            axes.set_ylabel("metric delta" if has_metric else "output SQNR (dB)")
            axes.set_xticks(range(len(layers)))
            axes.set_xticklabels(layers, rotation=90, fontsize=7)
            axes.legend(fontsize=7)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=100)
        return path
