"""Weights a model reads outside their module's ``forward`` (``F.linear(x, self.qkv.weight)``,
as torchvision's Swin attention does): such a layer, quantized, would never run, so its
quantizers would never calibrate and the model would compute with the float weight anyway.

Two checks, both leaving the layer float with its reason in the report (never an uncalibrated
quantizer at `convert`, never an eval that claims integers and runs float):

- `read_outside_forward` (at `quantize_model`): in the traced graphs, a parameter of a layer
  surgery would swap is read directly (a ``get_attr`` node) and the layer itself is never
  called. Such a layer is not swapped.
- `revert_unobserved` (after calibration, where the graph did not show it: untraced code): a
  quantized layer none of whose quantizers observed anything is swapped back to float.
"""

from __future__ import annotations

import warnings

from torch import fx, nn

from qat_lightning.nn import QuantModule, quant_type_for
from qat_lightning.surgery.graph import Region, owner_of
from qat_lightning.surgery.report import LayerRow, QuantizationReport

READ_OUTSIDE = "its weight is read outside its forward"


def _reader(node: fx.Node, region: Region) -> str:
    """``shifted_window_attention in features.1.0.attn.forward`` for a node using a weight."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    if node.op == "call_method":
        name = f".{target}()"
    elif node.op == "call_module":
        name = f"module {region.full_name(str(target))}"
    owner = region.full_name(owner_of(node))
    return f"{name} in {owner or 'the root'}.forward"


def read_outside_forward(model: nn.Module, regions: list[Region]) -> dict[str, str]:
    """Layers with a registered quantized type whose parameters the traced graphs read
    directly while never calling the layer: ``{qualified name: reason}``."""
    called: set[str] = set()
    reads: dict[str, tuple[str, list[str]]] = {}
    for region in regions:
        if region.graph is None:
            continue
        for node in region.graph.nodes:
            if node.op == "call_module":
                called.add(region.full_name(str(node.target)))
            elif node.op == "get_attr":
                owner, _, param = region.full_name(str(node.target)).rpartition(".")
                readers = reads.setdefault(owner, (param, []))[1]
                readers += [_reader(user, region) for user in node.users]
    found: dict[str, str] = {}
    for owner, (param, readers) in reads.items():
        if not owner or owner in called:
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if param not in module._parameters or quant_type_for(module) is None:
            continue
        by = ", ".join(sorted(set(readers))) or "a graph node"
        found[owner] = (
            f"{READ_OUTSIDE}: the model reads {owner}.{param} directly ({by}) and never calls "
            f"{type(module).__name__}.forward, so a quantized layer would never run nor "
            "calibrate; it stays float"
        )
    return found


def _top_quant_modules(model: nn.Module, prefix: str = ""):
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, QuantModule):
            yield full, child
        else:
            yield from _top_quant_modules(child, full)


def _observed_nothing(module: QuantModule) -> bool:
    calibrated = [
        q
        for q in module.quantizers()
        if q.scheme.representation != "fixed_point" and not q.scheme.dynamic
    ]
    return bool(calibrated) and not any(q.observer.has_data for q in calibrated)


def revert_unobserved(model: nn.Module, report: QuantizationReport | None = None) -> list[str]:
    """Swap back to float every quantized layer of ``model`` none of whose quantizers observed
    anything during the calibration that just ran; warn once per layer and mark its row of
    ``report`` float with the reason. Returns the names of the reverted layers."""
    reverted = []
    for name, module in list(_top_quant_modules(model)):
        if not _observed_nothing(module):
            continue
        float_module = module.to_float()
        for parent in model.modules():
            for key, child in list(parent._modules.items()):
                if child is module:
                    parent._modules[key] = float_module
        what = READ_OUTSIDE if "weight" in module._parameters else "it is never called"
        reason = (
            f"observed nothing during calibration: {what} (or it does not run on the "
            "calibration data), so it has no encodings; it stays float"
        )
        warnings.warn(
            f"calibration: layer {name!r} ({type(module).__name__}) {reason}", stacklevel=3
        )
        reverted.append(name)
        if report is not None:
            _mark_float(report, name, type(float_module).__name__, reason)
        _forget_as_producer(model, name, module, report)
    return reverted


def _forget_as_producer(
    model: nn.Module, name: str, reverted: QuantModule, report: QuantizationReport | None
) -> None:
    """Layers whose input encoding was ``reverted``'s output quantizer (surgery removed their
    own as a duplicate) now take a float input: they drop the reference, and say so."""
    gone = {id(q) for q in reverted.quantizers()}
    for consumer_name, consumer in _top_quant_modules(model):
        sources = consumer.__dict__.get("_input_sources", {})
        for index in [i for i, q in sources.items() if id(q) in gone]:
            del sources[index]
            line = (
                f"calibration: layer {consumer_name!r} ({type(consumer).__name__}): its input "
                f"{index} comes from {name!r}, which stays float, so that input is not "
                "quantized (float input; it converts and exports in fake quant)"
            )
            warnings.warn(line, stacklevel=4)
            if report is not None:
                report.warnings.append(line)


def _mark_float(report: QuantizationReport, name: str, after: str, reason: str) -> None:
    try:
        row = report.row(name)
    except KeyError:
        report.rows.append(LayerRow(name, after, after, "float", note=reason))
        return
    row.status, row.after, row.inputs, row.params = "float", after, None, None
    row.input_quantizers, row.note = None, reason
