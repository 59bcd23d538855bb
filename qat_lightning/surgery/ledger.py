"""The bookkeeping of `quantize_model`: one report row per layer, and why each stays float.

`SurgeryLedger` holds the surgery's state (the model, the config, the report, which modules
have their row, which quantized modules were made) and writes the report: a row per layer
(`_row`), the reason a module is left float (`_leaf`, `_own_parameters`,
`_children_float`, `_root_ops`, `_warn_untraced`), and the final counts, unmatched patterns
and model order (`_finish`). The swap itself (fuse, rewrite, swap by registry) is
`qat_lightning.surgery.quantize._Surgery`, built on it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qat_lightning.nn.registry import unregistered_reason
from qat_lightning.quant import Quantizer
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.graph import NO_COMPUTE, Region, TensorGuess, functional_op, owner_of
from qat_lightning.surgery.report import LayerRow, QuantizationReport, stays_float_reason


class SurgeryLedger:
    """The state of one `quantize_model` run and the report it writes."""

    def __init__(self, model: nn.Module, config: QuantConfig) -> None:
        self.model, self.config = model, config
        self.report = QuantizationReport(inputs=config.inputs, params=config.params)
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.names = list(self.order)
        # Original modules that have their row already, kept alive: a replaced module's id
        # must not be reused by a module made later in the surgery.
        self.done: dict[int, nn.Module] = {}
        self.made: dict[int, tuple[nn.Module, LayerRow]] = {}  # quantized modules made here
        self.bn_notes: dict[str, str] = {}
        # Identity -> the ReLU module whose slot it took (applied inside a fused layer)
        self.fused_relus: dict[int, tuple[nn.Module, nn.Module]] = {}
        first = next(iter([*model.parameters(), *model.buffers()]), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def _row(self, name: str, module: nn.Module | None, status: str, **fields: Any) -> LayerRow:
        before = fields.pop("before", type(module).__name__)
        row = LayerRow(name, before, fields.pop("after", before), status, **fields)
        self.report.rows.append(row)
        if module is not None:
            self.done[id(module)] = module
        return row

    def _made(self, module: nn.Module, row: LayerRow) -> None:
        device = next(iter([*module.parameters(), *module.buffers()]), None)
        device = device.device if device is not None else self.device
        for quantizer in module.modules():
            if isinstance(quantizer, Quantizer):
                quantizer.to(device)
        self.made[id(module)] = (module, row)

    def _warn_untraced(self, region: Region) -> None:
        self.report.traced = False
        kind = type(region.module).__name__
        where = f"{region.prefix!r} ({kind})" if region.prefix else f"the model ({kind})"
        fusion = "Conv+BN(+ReLU) fused by module order" if self.config.fuse else "no fusion"
        self.report.warnings.append(
            f"{where} does not trace with torch.fx ({region.error}): {fusion} among its direct "
            "children, functional ops in its forward stay float, and its direct children keep "
            "all their input quantizers"
        )

    def _children_float(self, module: nn.Module, prefix: str) -> None:
        note = f"{type(module).__name__}.forward reads its parameters directly, not calling it"
        for name, child in module.named_modules(prefix=prefix):
            if child is not module and child._parameters and id(child) not in self.done:
                self._row(name, child, "float", note=note)

    def _own_parameters(self, name: str, module: nn.Module) -> None:
        own = [n for n, p in module._parameters.items() if p is not None]
        if own:
            self._row(
                name,
                module,
                "float",
                before=type(module).__name__,
                note=f"its own parameters {own} stay float (only its children are swapped)",
            )

    def _leaf(self, module: nn.Module, name: str) -> None:
        if isinstance(module, nn.modules.loss._Loss):
            return  # a loss is not part of the model's function
        state = [*module._parameters.values(), *module._buffers.values()]
        stateful = any(v is not None for v in state)
        torch_layer = type(module).__module__.startswith("torch.nn")
        empty = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        kept = stays_float_reason(module)  # LayerNorm, Softmax, GELU: float by design
        trivial = isinstance(module, NO_COMPUTE) or empty or not torch_layer
        if not stateful and not kept and trivial:
            return  # no parameters and no compute worth a row (Identity, Dropout, Flatten...)
        pattern = self.config.skip_pattern(name)
        if pattern is not None:
            self._row(name, module, "skipped", note=f"matches skip pattern {pattern!r}")
            return
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            note = self.bn_notes.get(name) or (
                "not fused: no Conv/Linear feeds it" if self.config.fuse else "fuse=False"
            )
        else:
            note = (
                unregistered_reason(module)
                or kept
                or f"no quantized type registered for {type(module).__name__}"
            )
        self._row(name, module, "float", note=note)

    def _root_ops(self, region: Region) -> None:
        """Functional ops in the root's own forward: the root keeps its class, so they stay."""
        is_tensor = TensorGuess()
        for node in region.graph.nodes:
            op = functional_op(node, is_tensor)
            if op is not None and not owner_of(node):
                self._row(
                    node.name,
                    None,
                    "float",
                    before=op.label,
                    note=f"{op.label} in the root's own forward "
                    f"({type(self.model).__name__}.forward): the root keeps its class and "
                    "cannot be rewritten; use a module (qat_lightning.nn.Add, ...) there",
                )

    # -- 5. report -------------------------------------------------------------------------------
    def _finish(self, removed: int) -> None:
        for module, row in self.made.values():
            row.input_quantizers = sum(q is not None for q in module.input_quantizers)
        for pattern in self.config.unmatched_patterns(self.names):
            kind = "skip" if pattern in self.config.skip else "override"
            message = f"{kind} pattern {pattern!r} matches no module"
            self.report.warnings.append(message)
            warnings.warn(
                f"quantize_model: {message} (names are model.named_modules() names)", stacklevel=4
            )
        if not self.report.traced:
            self.report.warnings.append(
                f"{removed} input quantizers removed; modules called from untraced code keep "
                "theirs (each activation may be quantized twice there)"
            )
        self.report.rows.sort(key=self._rank)

    def _rank(self, row: LayerRow) -> tuple[int, int]:
        """Model order; a functional op right after the last module of its owner."""
        if row.name in self.order:
            return self.order[row.name], 0
        owner = row.name.rpartition(".")[0]
        inside = [i for n, i in self.order.items() if n == owner or n.startswith(owner + ".")]
        return (max(inside), 1) if owner else (len(self.order), 1)
