"""`quantize_model`: fuse, rewrite functional ops, swap by registry, prune input quantizers.

The steps, in order, each on the user's model in place:

1. **Trace** the model with torch.fx (quantized modules and torch.nn layers are leaves). Where
   it does not trace, each container child is traced on its own, recursively.
2. **Fuse** Conv/Linear + BatchNorm (+ ReLU) found in the graph (by module order where there is
   no graph): the layer's slot gets the fused module, the BatchNorm's (and ReLU's) `Identity`.
3. **Rewrite** modules whose ``forward`` has functional ``+``, ``*``, ``@``, ``torch.cat`` or
   ``F.scaled_dot_product_attention`` on activations into GraphModules calling `QuantAdd` /
   `QuantMul` / `QuantMatMul` / `QuantCat` / `QuantScaledDotProductAttention`.
   A rewrite must not change what the block computes: blocks whose graph would bake in a
   branch (optional arguments, ``self.training``, grad mode) keep their forward; every other
   one is checked against its own forward on its first real inputs and falls back (with a
   warning and a report entry "functional ops stay float: <reason>") if they differ.
4. **Swap** every other module that has a registered quantized type (`quant_type_for`: its
   exact type's, else its nearest registered base class's).
5. **Prune** input quantizers whose input is already quantized by its producer.

Everything not quantized that has parameters or compute is listed in the report with a reason.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from qat_lightning.nn import (
    QuantAdd,
    QuantCat,
    QuantMatMul,
    QuantModule,
    QuantMul,
    QuantScaledDotProductAttention,
    fused_bn_type,
    quant_type_for,
)
from qat_lightning.quant import Quantizer
from qat_lightning.quant.grouped import GroupSizeError
from qat_lightning.surgery import hf_attention
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.fast_path import disable_fast_paths
from qat_lightning.surgery.fuse import FusionGroup, plan_graph, plan_order
from qat_lightning.surgery.graph import (
    FunctionalOp,
    Region,
    TensorGuess,
    error_line,
    functional_op,
    join,
    owner_of,
    trace_regions,
)
from qat_lightning.surgery.ledger import SurgeryLedger
from qat_lightning.surgery.norm_act import split_norm_acts
from qat_lightning.surgery.outside_reads import read_outside_forward
from qat_lightning.surgery.prune import prune_input_quantizers
from qat_lightning.surgery.report import ATTENTION_SOFTMAX, QuantizationReport
from qat_lightning.surgery.rewrite import ArgumentDependentGraph, rewrite_module
from qat_lightning.surgery.rewrite_check import attach_check

FUNCTIONAL_MODULES = {"add": QuantAdd, "mul": QuantMul, "matmul": QuantMatMul, "cat": QuantCat}
FUNCTIONAL_MODULES["sdpa"] = QuantScaledDotProductAttention
# Modules whose forward reads their children's parameters without calling them (MHA reads
# ``out_proj.weight``): a quantized child would never run nor calibrate. They stay float.
READS_CHILD_PARAMETERS = (nn.MultiheadAttention,)


def quantize_model(
    model: nn.Module, config: QuantConfig | dict[str, Any] | None = None, **changes: Any
) -> QuantizationReport:
    """Quantize ``model`` in place for QAT and report what happened to every layer.

    The root module keeps its class and identity, and every float `Parameter` object stays in
    the model (shared by the quantized modules), so an optimizer built before still works.
    A model that already holds quantized modules is refused (`ValueError`): surgery is not
    applied twice.

    Args:
        model: the float model (train or eval mode; its mode is kept).
        config: a `QuantConfig`, a dict of its fields, or None for the defaults.
        **changes: config fields to set on top, e.g. ``skip=["fc"]``.

    Returns:
        a `QuantizationReport`: one row per layer, counts and warnings.

    Example:
        >>> report = quantize_model(resnet, params={"bits": 4}, skip=["fc"])
        >>> print(report)
    """
    config = QuantConfig.from_any(config, **changes)
    for name, module in model.named_modules():
        if isinstance(module, (QuantModule, Quantizer)):
            raise ValueError(
                f"quantize_model: {name or 'the model'!r} is already quantized "
                f"({type(module).__name__}); surgery runs once on a float model. To start "
                "again, rebuild the float model (or swap back with each module's to_float())"
            )
    split = split_norm_acts(model, config)  # timm's BatchNormAct2d -> BatchNorm, act
    report = _Surgery(model, config).run()
    for old, new in split.items():  # a split BatchNorm may then fold into its conv
        report.renamed[old] = report.renamed.pop(new, new)
    return report


class _Surgery(SurgeryLedger):
    """The swap itself: fuse, rewrite functional ops, swap by registry, route attention,
    prune; the report rows are written by `SurgeryLedger`."""

    def run(self) -> QuantizationReport:
        self.existing = {id(m) for m in self.model.modules()}
        regions = trace_regions(self.model)
        for region in regions:
            if region.graph is None:
                self._warn_untraced(region)
        self.outside = read_outside_forward(self.model, regions)  # these stay float
        for name, reason in self.outside.items():
            self._row(name, self.model.get_submodule(name), "float", note=reason)
            warnings.warn(f"quantize_model: layer {name!r}: {reason}", stacklevel=3)
        groups = []
        if self.config.fuse:
            for region in regions:
                if region.graph is not None:
                    found, notes = plan_graph(region, self.config)
                else:
                    found, notes = plan_order(region.module, region.prefix, self.config)
                groups += found
                self.bn_notes.update(notes)
            for group in groups:
                self._fuse(group)
        self._rewrite(regions, groups)
        if quant_type_for(self.model) is not None:
            self._row("", self.model, "float", note="the root module keeps its class")
        else:
            self._own_parameters("", self.model)
        self._swap(self.model, "")
        self._route_attention()
        self.report.warnings.extend(disable_fast_paths(self.model))
        removed = prune_input_quantizers(trace_regions(self.model))
        self._finish(removed)
        return self.report

    # -- helpers -------------------------------------------------------------------------------
    def _slots(self, module: nn.Module) -> list[tuple[nn.Module, str]]:
        """Every (parent, key) holding ``module`` (a module may sit in several)."""
        return [
            (parent, key)
            for parent in self.model.modules()
            for key, child in parent._modules.items()
            if child is module
        ]

    def _replace(self, old: nn.Module, new: nn.Module, slots: list | None = None) -> None:
        """Put ``new`` where ``old`` was; the modules ``new`` brings (its quantizers, an
        Identity) take ``old``'s train/eval mode, so that a layer in eval mode does not
        observe what it evaluates. Modules the model held before keep theirs."""
        for module in new.modules():
            if id(module) not in self.existing:
                module.training = old.training
                self.existing.add(id(module))
        for parent, key in self._slots(old) if slots is None else slots:
            parent._modules[key] = new

    # -- 2. fusion -------------------------------------------------------------------------------
    def _fuse(self, group: FusionGroup) -> None:
        layer = self.model.get_submodule(group.layer)
        bn = self.model.get_submodule(group.bn)
        inputs, params = self.config.schemes_for(group.layer)
        if inputs is None and params is None:
            self.bn_notes[group.bn] = f"not fused: {group.layer} has no scheme (both None)"
            return
        bn_slots = self._slots(bn)  # before the fused module holds it too (as its ``bn``)
        fused = fused_bn_type(layer, group.relu).from_modules(layer, bn, inputs, params)
        how = f"{group.layer} + {group.bn}" + (" + ReLU" if group.relu else "")
        row = self._row(
            group.layer,
            layer,
            "fused",
            after=type(fused).__name__,
            inputs=inputs,
            params=params,
            note=f"fused {how}",
        )
        self._made(fused, row)
        self._replace(layer, fused)
        self._replace(bn, nn.Identity(), bn_slots)
        self._row(group.bn, bn, "fused", after="Identity", note=f"folded into {group.layer}")
        self.report.renamed[group.bn] = f"{group.layer}.bn"
        if group.relu_slot is not None:
            relu = self.model.get_submodule(group.relu_slot)
            identity = nn.Identity()
            self._replace(relu, identity)
            self.fused_relus[id(identity)] = (identity, relu)
            self._row(
                group.relu_slot,
                relu,
                "fused",
                after="Identity",
                note=f"applied inside {group.layer}",
            )

    # -- 3. functional ops -----------------------------------------------------------------------
    def _rewrite(self, regions: list[Region], groups: list[FusionGroup]) -> None:
        owners = {g.relu_owner for g in groups if g.relu_owner is not None}
        for region in regions:
            if region.graph is None:
                continue
            is_tensor = TensorGuess()
            for node in region.graph.nodes:
                if functional_op(node, is_tensor) is not None:
                    owners.add(region.full_name(owner_of(node)))
        if "" in owners and regions[0].graph is not None:
            self._root_ops(regions[0])
        for path in sorted(
            owners - {""}, key=lambda p: (-p.count("."), self.order.get(p, 0))
        ):  # innermost first
            owner = self.model.get_submodule(path)
            try:
                gm = rewrite_module(
                    owner, lambda op, name, path=path: self._op_module(op, path, name)
                )
            except ArgumentDependentGraph as err:  # a graph would bake in a branch
                self.report.warnings.append(
                    f"functional ops in {path!r} ({type(owner).__name__}.forward) stay float: {err}"
                )
                continue
            except Exception as err:  # tracing the owner alone failed: its ops stay float
                self.report.warnings.append(
                    f"functional ops in {path!r} ({type(owner).__name__}.forward) stay float: it "
                    f"does not trace on its own ({error_line(err)})"
                )
                continue
            if gm is not None:
                self._replace(owner, gm)
                self.report.rewritten.append(path)
                # checked against owner's own forward on its first real call
                attach_check(gm, owner, path, self.model, self.report, self.fused_relus)

    def _op_module(self, op: FunctionalOp, owner: str, name: str) -> nn.Module | None:
        full = join(owner, name)
        self.names.append(full)
        where = f"{op.label} in {owner}.forward"
        pattern = self.config.skip_pattern(full)
        if pattern is not None:
            self._row(
                full,
                None,
                "skipped",
                before=op.label,
                note=f"{where}; matches skip pattern {pattern!r}",
            )
            return None
        inputs, _ = self.config.schemes_for(full)
        if inputs is None:
            self._row(full, None, "float", before=op.label, note=f"{where}; inputs scheme None")
            return None
        extra = {"dim": op.dim, "num_inputs": len(op.operands)} if op.kind == "cat" else {}
        module = FUNCTIONAL_MODULES[op.kind].create(inputs, **extra)
        row = self._row(
            full,
            None,
            "quantized",
            before=op.label,
            after=type(module).__name__,
            inputs=inputs,
            note=f"{where} (module rewritten as a GraphModule)"
            + (f"; {ATTENTION_SOFTMAX}" if op.kind == "sdpa" else ""),
        )
        self._made(module, row)
        return module

    def _route_attention(self) -> None:
        """transformers attention layers' attention (`surgery.hf_attention`)."""
        for plan in hf_attention.plan(self.model, self.config):
            self.names.append(plan.name)
            row = self._row(plan.name, None, plan.status, **plan.fields)
            if plan.module is not None:
                self._made(plan.module, row)
                hf_attention.route(plan.layer, plan.module)
            elif plan.warning:
                self.report.warnings.append(plan.warning)

    # -- 4. swap by registry ---------------------------------------------------------------------
    def _swap(self, module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            full = join(prefix, name)
            if child is None or id(child) in self.done or id(child) in self.made:
                continue
            if full in self.outside:  # (a rewritten block holds a bare module with the weight)
                continue
            qtype = quant_type_for(child)
            if qtype is not None:
                self._swap_one(child, full, qtype)
            elif any(c is not None for c in child._modules.values()):
                self.done[id(child)] = child
                self._own_parameters(full, child)
                if isinstance(child, READS_CHILD_PARAMETERS):
                    self._children_float(child, full)
                else:
                    self._swap(child, full)
            else:
                self._leaf(child, full)

    def _swap_one(self, module: nn.Module, name: str, qtype: type) -> None:
        pattern = self.config.skip_pattern(name)
        if pattern is not None:
            self._row(name, module, "skipped", note=f"matches skip pattern {pattern!r}")
            return
        inputs, params = self.config.schemes_for(name)
        if inputs is None and params is None:
            self._row(name, module, "float", note="inputs and params schemes are both None")
            return
        try:
            qmodule = qtype.from_float(module, inputs, params)
        except GroupSizeError as err:  # the scheme asked for cannot apply: refuse, never float
            raise GroupSizeError(
                f"quantize_model: layer {name!r} ({type(module).__name__}): {err}"
            ) from None
        except (ValueError, TypeError) as err:
            self._row(name, module, "float", note=f"{qtype.__name__}.from_float failed: {err}")
            self.report.warnings.append(f"{name!r} left float: {err}")
            return
        if not any(q is not None for q in qmodule.quantizers()):
            note = "nothing to quantize: inputs scheme None and no quantized parameter"
            if inputs is not None and inputs.dynamic:
                note = "nothing to quantize: dynamic activations are for Linear inputs only"
            self._row(name, module, "float", note=note)
            return
        row = self._row(
            name,
            module,
            "quantized",
            after=qtype.__name__,
            inputs=inputs,
            params=params if any(qmodule.param_quantizers.values()) else None,
        )
        self._made(qmodule, row)
        self._replace(module, qmodule)
