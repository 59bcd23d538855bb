"""`QuantizationReport`: what `quantize_model` did to every layer, and what it left float."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qat_lightning.quant import QuantScheme

STATUSES = ("quantized", "fused", "skipped", "float")

# Layers that stay float by design, and why: the report's note for them (class name endings,
# looked up along the MRO). Measured with onnxruntime 1.32 on CPU: ``DQ -> op -> Q`` around
# LayerNormalization, RMSNormalization or Gelu stays a float op (no integer kernel, no QDQ
# fusion), so a quantized twin would add rounding and no integer compute.
_NO_INTEGER_KERNEL = (
    "onnxruntime has no integer kernel or QDQ fusion for {op} on CPU (DequantizeLinear -> {op} "
    "-> QuantizeLinear stays a float {op}); its input and output are quantized by its "
    "neighbours where they are quantized layers"
)
STAYS_FLOAT = {
    "LayerNorm": _NO_INTEGER_KERNEL.format(op="LayerNormalization"),
    "RMSNorm": _NO_INTEGER_KERNEL.format(op="RMSNormalization"),
    "GELUActivation": _NO_INTEGER_KERNEL.format(op="Gelu"),
}
ATTENTION_SOFTMAX = (
    "q·kᵀ and p·v are integer, the scale, masks and Softmax float between them (the scaled, "
    "masked scores have no integer grid: -inf masks; onnxruntime fuses DequantizeLinear -> "
    "Softmax -> QuantizeLinear into QLinearSoftmax only for a quantized input); the "
    "probabilities are quantized unsigned"
)


def stays_float_reason(module: object) -> str | None:
    """Why ``module`` (a LayerNorm, an RMSNorm, a transformers GELU activation) stays float
    by design, or None."""
    for cls in type(module).__mro__:
        for ending, reason in STAYS_FLOAT.items():
            if cls.__name__.endswith(ending):
                return f"stays float by design: {reason}"
    return None


def describe_scheme(scheme: QuantScheme | None) -> str:
    """A short label: ``u8 aff``, ``s8 sym pc``, ``Q3.4``; ``float`` for None."""
    if scheme is None:
        return "float"
    if scheme.representation == "fixed_point":
        label = f"Q{scheme.bits - scheme.frac_bits}.{scheme.frac_bits}"
    else:
        sign = "s" if scheme.signed else "u"
        label = f"{sign}{scheme.bits} {'sym' if scheme.symmetric else 'aff'}"
    if scheme.per_channel:
        label += " pc"
    if scheme.per_group:
        label += f" g{scheme.group_size}"
    if scheme.granularity == "per_token":
        label += " tok"
    if scheme.dynamic:
        label += " dyn"
    if scheme.learnable:
        label += " lsq"
    return label


def scheme_text(scheme: QuantScheme | None) -> str:
    """Every field that matters, in one line: ``8-bit affine unsigned per_tensor
    moving_minmax``; ``float`` for None."""
    if scheme is None:
        return "float (not quantized)"
    kind = "symmetric" if scheme.symmetric else "affine"
    sign = "signed" if scheme.signed else "unsigned"
    extras = [
        f"{scheme.representation} Q.{scheme.frac_bits}" if scheme.frac_bits is not None else "",
        "narrow range" if scheme.narrow_range else "",
        "learnable (LSQ)" if scheme.learnable else "",
    ]
    granularity = scheme.granularity
    if scheme.per_group:
        granularity += f" (group_size {scheme.group_size})"
    observer = "dynamic (no observer)" if scheme.dynamic else scheme.observer
    words = [f"{scheme.bits}-bit", kind, sign, granularity, observer, *extras]
    return " ".join(w for w in words if w)


@dataclass
class LayerRow:
    """One layer (or one functional op) of the model.

    Attributes:
        name: qualified module name (for a functional op: the name of its new module, or the
            graph node's name when it stays float).
        before: the float type (``"add()"`` for a functional op).
        after: the type now in that slot.
        status: ``quantized``, ``fused`` (went into a fused Conv/Linear+BN module),
            ``skipped`` (a skip pattern matched) or ``float``.
        inputs: the activation scheme of the new module, if any.
        params: the weight scheme of the new module, if any.
        note: why, where it helps (always set for ``float``).
        input_quantizers: how many input quantizers the module kept after pruning.
    """

    name: str
    before: str
    after: str
    status: str
    inputs: QuantScheme | None = None
    params: QuantScheme | None = None
    note: str = ""
    input_quantizers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "before": self.before,
            "after": self.after,
            "status": self.status,
            "inputs": None if self.inputs is None else self.inputs.to_dict(),
            "params": None if self.params is None else self.params.to_dict(),
            "note": self.note,
            "input_quantizers": self.input_quantizers,
        }


@dataclass
class QuantizationReport:
    """The result of `quantize_model`.

    Attributes:
        rows: one `LayerRow` per layer with parameters or compute, and per functional op.
        warnings: things the user should know (tracing failed, a pattern matched nothing...).
        rewritten: modules replaced by a ``torch.fx.GraphModule`` so that functional ops in
            their ``forward`` call quantized modules.
        renamed: old -> new module prefixes of state_dict keys that moved (a fused BatchNorm
            ``bn1`` now lives at ``conv1.bn``), to load a float checkpoint after surgery.
        traced: whether the whole model traced with torch.fx.
        inputs: the resolved activation scheme of the config (defaults merged in), or None.
        params: the resolved weight scheme of the config, or None.
    """

    rows: list[LayerRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    traced: bool = True
    inputs: QuantScheme | None = None
    params: QuantScheme | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Rows per status (every status present, 0 if none)."""
        counter = Counter(row.status for row in self.rows)
        return {status: counter.get(status, 0) for status in STATUSES}

    def row(self, name: str) -> LayerRow:
        """The row called ``name`` (KeyError if there is none)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r} in the report")

    @property
    def schemes(self) -> dict[str, QuantScheme | None]:
        """The resolved ``inputs`` / ``params`` schemes the model was quantized with."""
        return {"inputs": self.inputs, "params": self.params}

    @property
    def kept_input_quantizers(self) -> list[str]:
        """Names of the modules that still quantize an input themselves (float producers)."""
        return [r.name for r in self.rows if r.input_quantizers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "rows": [row.to_dict() for row in self.rows],
            "counts": self.counts,
            "warnings": list(self.warnings),
            "rewritten": list(self.rewritten),
            "renamed": dict(self.renamed),
            "traced": self.traced,
            "inputs": None if self.inputs is None else self.inputs.to_dict(),
            "params": None if self.params is None else self.params.to_dict(),
        }

    def __str__(self) -> str:
        header = ("name", "before", "after", "status", "inputs", "params", "in-q", "note")
        table = [header] + [
            (
                r.name or "(root)",
                r.before,
                r.after,
                r.status,
                describe_scheme(r.inputs) if r.inputs is not None else "-",
                describe_scheme(r.params) if r.params is not None else "-",
                "" if r.input_quantizers is None else str(r.input_quantizers),
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
            + "  "
            + line[-1]
            for line in table
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines[:0] = [f"{role}: {scheme_text(s)}" for role, s in self.schemes.items()]
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items())
        lines.append(f"{len(self.rows)} layers: {counts}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(line.rstrip() for line in lines)
