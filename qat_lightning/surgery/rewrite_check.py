"""A rewritten block is checked against its own forward on its first real inputs.

A traced graph keeps the branches taken while tracing. Branches on the training mode and
grad mode are found when the block is traced (`rewrite.check_mode_independent`); a branch on a
flag, a config attribute or global state set after `quantize_model` shows only when the block
runs. So until its first real call a rewritten block's ``forward`` is a `RewriteCheck`: it runs
the graph and the block's original forward on copies of the inputs, in float with every
quantizer of the block off, without grad, with the same random state, and keeps its buffers
(BN statistics, observers) as they were. Equal outputs (exactly): the check is dropped with the
reference to the original, and the graph runs from then on. Any difference: the block runs its
original forward from then on (`fall_back`), its functional ops stay float, the input
quantizers pruned around it are given back, one line warns and the report says so.

A flag changed after the block's first call is not seen; change flags before quantizing.
State dict keys are unchanged by the check. A checkpoint saved after a fallback lacks the
block's functional-op modules: loading it into a freshly quantized model falls back the same
block first (a load-state-dict pre-hook of the quantized root), so resume loads exactly.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from qat_lightning.nn import (
    QuantAdd,
    QuantCat,
    QuantMatMul,
    QuantModule,
    QuantMul,
    QuantScaledDotProductAttention,
)
from qat_lightning.quant import Quantizer
from qat_lightning.surgery.graph import error_line, join
from qat_lightning.surgery.report import QuantizationReport

_FLOAT_OPS = {
    QuantAdd: torch.add,
    QuantMul: torch.mul,
    QuantMatMul: torch.matmul,
    QuantScaledDotProductAttention: F.scaled_dot_product_attention,
}
_NOT_SYNCED = ("_modules", "_parameters", "_buffers", "forward", "training")


class OriginalForward:
    """The block's own forward run on the GraphModule's current children, parameters,
    buffers, mode and attributes (the original object shares the parameter and buffer dicts).

    ``relus``: children whose ReLU went into a fused Conv+BN+ReLU or a fused add (their slot
    holds an Identity): the original code may call that ReLU again elsewhere (torchvision's
    ``BasicBlock`` applies ``self.relu`` after its add too), so here the slot holds the ReLU.
    """

    def __init__(
        self, original: nn.Module, gm: fx.GraphModule, relus: dict[str, nn.Module]
    ) -> None:
        self.original, self.gm, self.relus = original, gm, relus
        for key in ("_parameters", "_buffers"):
            original.__dict__[key] = gm.__dict__[key]
        self.synced = [
            k for k in vars(original) if k not in _NOT_SYNCED and "hook" not in k and k in vars(gm)
        ]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original, state = self.original, self.gm.__dict__
        original.__dict__["_modules"] = {
            key: self.relus.get(key, child) for key, child in self.gm._modules.items()
        }
        original.training = self.gm.training
        for key in self.synced:
            if key in state:
                original.__dict__[key] = state[key]
        return original.forward(*args, **kwargs)


class RewriteCheck:
    """``forward`` of a rewritten block until its first real call (see the module docstring)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        original: nn.Module,
        name: str,
        root: nn.Module,
        report: QuantizationReport,
        added: list[str],
        relus: dict[str, nn.Module],
    ) -> None:
        self.gm, self.name, self.root, self.report, self.added = gm, name, root, report, added
        self.original = OriginalForward(original, gm, relus)
        self.kind = type(original).__name__

    def __deepcopy__(self, memo: dict) -> RewriteCheck:
        # The root comes along only if it is being copied too (a copy of a part of the model
        # gives back input quantizers within that part only).
        new = RewriteCheck.__new__(RewriteCheck)
        memo[id(self)] = new
        for key, value in vars(self).items():
            new.__dict__[key] = memo.get(id(value)) if key == "root" else copy.deepcopy(value, memo)
        return new

    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gm = self.gm
        if _symbolic(args, kwargs):  # fx / jit tracing, export: the graph, still unchecked
            return type(gm).forward(gm, *args, **kwargs)
        reason = self.compare(args, kwargs)
        gm.__dict__.pop("forward", None)  # checked once: the reference goes
        if reason is not None:
            fall_back(self, reason)
        self.root = self.report = None
        return gm.forward(*args, **kwargs)

    def compare(self, args: tuple, kwargs: dict) -> str | None:
        """None if the graph computes exactly what the original forward computes on these
        inputs (in float, quantizers off), else why not."""
        gm = self.gm
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(_quantizers_off(gm))
            stack.enter_context(torch.random.fork_rng(devices=devices))
            restore = _kept_buffers(gm)
            rng = torch.get_rng_state()
            expected = self.original(*_copies(args), **_copies(kwargs))
            restore()
            torch.set_rng_state(rng)
            try:
                got = type(gm).forward(gm, *_copies(args), **_copies(kwargs))
            except Exception as err:  # the graph of other inputs: e.g. a baked-in branch
                return f"its traced graph fails on the first real inputs ({error_line(err)})"
            finally:
                restore()
        return difference(expected, got)


def attach_check(
    gm: fx.GraphModule,
    original: nn.Module,
    name: str,
    root: nn.Module,
    report: QuantizationReport,
    fused_relus: dict[int, tuple[nn.Module, nn.Module]] | None = None,
) -> None:
    """Make ``gm`` (the rewrite of ``original``, at ``name`` in ``root``) check itself on its
    first real call. ``fused_relus``: ``id(Identity) -> (Identity, ReLU)`` for the ReLU slots
    fusion emptied (see `OriginalForward`)."""
    added = [k for k in gm._modules if k not in original._modules]
    fused_relus = fused_relus or {}
    relus = {}
    for key, child in original._modules.items():
        if id(child) in fused_relus:  # the ReLU went into a fused Conv+BN+ReLU
            relus[key] = fused_relus[id(child)][1]
        elif gm._modules.get(key) is not child:  # a ReLU the rewrite made Identity (dead)
            relus[key] = child
    gm.__dict__["forward"] = RewriteCheck(gm, original, name, root, report, added, relus)
    if not getattr(root, "_qat_rewrite_hook", False):
        root.register_load_state_dict_pre_hook(_fall_back_as_saved)
        root.__dict__["_qat_rewrite_hook"] = True


def pending_checks(model: nn.Module) -> list[tuple[str, RewriteCheck]]:
    """The rewritten blocks of ``model`` not checked yet."""
    found = []
    for name, module in model.named_modules():
        check = module.__dict__.get("forward")
        if isinstance(check, RewriteCheck):
            found.append((name, check))
    return found


def fall_back(check: RewriteCheck, reason: str) -> None:
    """From now on ``check``'s block runs its original forward; its functional-op modules go,
    the input quantizers pruned inside or behind it come back, the report says why."""
    gm = check.gm
    gm.__dict__["forward"] = check.original
    _float_graph(gm, [name for name in check.added if name in gm._modules])
    removed = [gm._modules.pop(name) for name in check.added if name in gm._modules]
    inside = {id(m) for m in gm.modules()} | {id(m) for r in removed for m in r.modules()}
    gone = {id(m) for r in removed for m in r.modules()}
    restored = _give_back_input_quantizers(check.root or gm, inside, gone)
    message = (
        f"functional ops in {check.name!r} ({check.kind}.forward) stay float: {reason}; the "
        f"block runs its own forward ({restored} input quantizer(s) given back around it)"
    )
    report = check.report
    if report is not None:
        report.warnings.append(message)
        if check.name in report.rewritten:
            report.rewritten.remove(check.name)
        for row in report.rows:
            if row.name in {join(check.name, a) for a in check.added}:
                row.status, row.after = "float", row.before
                row.inputs = row.params = None
                row.note = f"functional ops stay float: {reason}"
    warnings.warn(f"quantize_model: {message}", stacklevel=3)


def _float_graph(gm: fx.GraphModule, names: list[str]) -> None:
    """Calls of the functional-op modules ``names`` in ``gm``'s graph become the float ops
    again, so the graph (unused now, but what ``deepcopy`` and pickling rebuild ``gm`` from)
    refers to no module that is gone."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in names:
            continue
        module = gm.get_submodule(node.target)
        with graph.inserting_before(node):
            if isinstance(module, QuantCat):
                new = graph.call_function(torch.cat, node.args, {"dim": module.dim})
            else:
                new = graph.call_function(_FLOAT_OPS[type(module)], node.args, node.kwargs)
            if getattr(module, "fused_relu", False):
                new = graph.call_function(torch.relu, (new,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _give_back_input_quantizers(root: nn.Module, inside: set[int], gone: set[int]) -> int:
    """Quantized modules in the block, or fed by a quantizer in it, quantize their inputs
    themselves again: the code path that fed them is not the traced one. A quantizer given
    back starts from its source's encoding, or, where the source left the model with the
    removed functional-op modules (``gone``), from nothing; during calibration it finishes
    with its source (`Quantizer.compute_encodings`)."""
    count = 0
    for module in root.modules():
        if not isinstance(module, QuantModule):
            continue
        sources = module.__dict__.get("_input_sources", {})
        for index, source in list(sources.items()):
            if id(module) not in inside and id(source) not in inside:
                continue
            channels = source.scale.numel() if source.scheme.per_channel else None
            quantizer = Quantizer(source.scheme, channels).to(source.scale.device)
            if source.scheme.learnable:  # a new Parameter: an optimizer built before lacks it
                warnings.warn(
                    f"quantize_model: the input quantizer given back to {type(module).__name__} "
                    "has a learnable scale that an optimizer built before this call does not "
                    "train; build the optimizer after the first forward",
                    stacklevel=4,
                )
            on_its_own = id(source) in gone
            if not on_its_own:
                quantizer.load_state_dict(source.state_dict())  # the grid pruning relied on
            quantizer.enable_observer(bool(source.observer_enabled))
            quantizer.enable_fake_quant(bool(source.fake_quant_enabled))
            if source._calibrating:  # inside compute_encodings: it ends with the source
                quantizer._calibrating = True
                source._followers.append((quantizer, on_its_own))
            module.input_quantizers[index] = quantizer
            del sources[index]
            count += 1
    return count


def _fall_back_as_saved(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of a quantized root: a block whose functional-op modules the
    checkpoint lacks fell back when it was saved; fall it back here too."""
    for name, check in pending_checks(module):
        keys = [prefix + join(name, added) + "." for added in check.added]
        if keys and not any(k.startswith(tuple(keys)) for k in state_dict):
            check.root = module
            fall_back(check, "the checkpoint was saved after this block fell back")
            check.root = check.report = None


def difference(expected: Any, got: Any) -> str | None:
    """None if ``got`` equals ``expected`` exactly (same structure, dtypes, shapes, values;
    NaN equal to NaN), else what differs."""
    leaves_e, spec_e = tree_flatten(expected)
    leaves_g, spec_g = tree_flatten(got)
    if spec_e != spec_g:
        return f"its output has another structure ({spec_g} instead of {spec_e})"
    for i, (a, b) in enumerate(zip(leaves_e, leaves_g, strict=True)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"output {i} is {b.dtype} {tuple(b.shape)}, not {a.dtype} {tuple(a.shape)}"
            same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
            if not bool(same.all()):
                diff = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
                return f"output {i} differs from its own forward's (max abs difference {diff:.3g})"
        elif type(a) is not type(b) or (isinstance(a, (bool, int, float, str)) and a != b):
            return f"output {i} is {b!r}, not {a!r}"
    return None


def _symbolic(args: tuple, kwargs: dict) -> bool:
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return True
    return any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0])


def _copies(tree: Any) -> Any:
    """Tensors cloned (a forward may change its inputs in place), the rest as it is."""
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _kept_buffers(module: nn.Module):
    """A function that puts every buffer of ``module`` back to its value now."""
    saved = [(buf, buf.clone()) for buf in module.buffers()]

    def restore() -> None:
        for buf, value in saved:
            if buf.shape == value.shape:
                buf.copy_(value)

    return restore


@contextmanager
def _quantizers_off(module: nn.Module):
    quantizers = [m for m in module.modules() if isinstance(m, Quantizer)]
    state = [(q, bool(q.observer_enabled), bool(q.fake_quant_enabled)) for q in quantizers]
    for q in quantizers:
        q.enable_observer(False).enable_fake_quant(False)
    try:
        yield
    finally:
        for q, observing, quantizing in state:
            q.enable_observer(observing).enable_fake_quant(quantizing)
