"""Rewrite a module's ``forward`` so that its functional ops call quantized modules.

``out += identity`` in a ResNet block is code, not a module, so nothing can be swapped for it.
The block is traced (its children as leaves, so the graph is exactly its own code) into a
``torch.fx.GraphModule``; each add / mul / matmul / cat / scaled_dot_product_attention node
becomes a call of a new submodule (``add``, ``add_1``, ``cat``, ``sdpa``...), and the
GraphModule takes the block's place in its parent. It holds the very same children, parameters
and buffers, in the same order, so parameter identity and state_dict keys are unchanged.

A traced graph is the code path taken for the tracer's proxies: every ``if arg is None`` takes
the branch of an argument that was passed. A block whose ``forward`` takes optional arguments
(a default value, ``*args`` or ``**kwargs``; Hugging Face's ``BertEmbeddings`` has
``token_type_ids=None``) is therefore not rewritten: it keeps its own forward, and the caller
reports its functional ops as float (`ArgumentDependentGraph`). Nor is a block whose traced
graph changes with its training mode or with grad mode (a branch on ``self.training`` or
``torch.is_grad_enabled()``): it is traced three times (as it is, in the other mode, with grad
toggled) and kept as it is unless the three graphs are the same code. Every other rewritten
block is checked against its own forward on its first real inputs (`rewrite_check`).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable

import torch
from torch import fx, nn

from qat_lightning.nn import QuantModule
from qat_lightning.surgery.graph import (
    FunctionalOp,
    TensorGuess,
    functional_op,
    is_relu,
    owner_of,
    trace,
)
from qat_lightning.surgery.modes import kept_modes

Build = Callable[[FunctionalOp, str], nn.Module | None]


class ArgumentDependentGraph(Exception):
    """A traced graph of the block would bake in branches: its ``forward`` has optional
    arguments, or its graph changes with the training mode or grad mode."""


class RewrittenBlock(fx.GraphModule):
    """The GraphModule a block is rewritten into. A deep copy keeps every attribute (a plain
    GraphModule's copy keeps only those its graph reads): the block's own attributes
    (``stride``, a config flag) and an instance-level ``forward`` (`rewrite_check`)."""

    def __deepcopy__(self, memo: dict) -> RewrittenBlock:
        copied = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():  # already copied once: the memo has them
            if key not in copied.__dict__:
                copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied


def optional_arguments(module: nn.Module) -> list[str]:
    """The arguments of ``module.forward`` a caller may leave out (``name=default``,
    ``*args``, ``**kwargs``), as written in the signature."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin): assume the worst
        return ["<unknown signature>"]
    found = []
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            found.append(f"*{parameter.name}")
        elif parameter.kind is parameter.VAR_KEYWORD:
            found.append(f"**{parameter.name}")
        elif parameter.default is not parameter.empty:
            found.append(f"{parameter.name}={parameter.default!r}")
    return found


def check_rewritable(owner: nn.Module) -> None:
    """Raise `ArgumentDependentGraph` if tracing ``owner`` could change what it computes."""
    optional = optional_arguments(owner)
    if optional:
        raise ArgumentDependentGraph(
            f"its forward takes optional arguments ({', '.join(optional)}): a traced graph "
            "would keep only the branches taken when they are passed, so the block keeps its "
            "own forward"
        )


def _trace_leaves(owner: nn.Module, keep_constants: bool = True) -> fx.Graph:
    try:
        return trace(owner, leaf_children=True, keep_constants=keep_constants)
    except Exception:  # e.g. a child's tuple output is unpacked: trace through children
        return trace(owner, keep_constants=keep_constants)


def _code(graph: fx.Graph) -> str:
    # a second trace numbers the tensor constants it stores on the module after the first's
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", graph.python_code("self").src)


def check_mode_independent(owner: nn.Module, graph: fx.Graph) -> None:
    """Raise `ArgumentDependentGraph` if ``owner`` traces to other code in the other training
    mode or with grad mode toggled (its forward branches on them)."""
    code = _code(graph)
    try:
        with kept_modes(owner, training=not owner.training):
            other_mode = _code(_trace_leaves(owner, keep_constants=False))
    except Exception:  # does not even trace in the other mode
        other_mode = None
    if other_mode != code:
        raise ArgumentDependentGraph(
            "its forward branches on self.training (its traced graph differs in train and "
            "eval mode), so the block keeps its own forward"
        )
    with torch.set_grad_enabled(not torch.is_grad_enabled()):
        try:
            other_grad = _code(_trace_leaves(owner, keep_constants=False))
        except Exception:
            other_grad = None
    if other_grad != code:
        raise ArgumentDependentGraph(
            "its forward branches on torch.is_grad_enabled() (its traced graph differs with "
            "and without grad), so the block keeps its own forward"
        )


def own_ops(graph: fx.Graph) -> list[FunctionalOp]:
    """The quantizable functional ops of the traced module's own code (not its children's)."""
    is_tensor = TensorGuess()
    ops = []
    for node in graph.nodes:
        op = functional_op(node, is_tensor) if not owner_of(node) else None
        if op is not None:
            ops.append(op)
    return ops


def _after_fused_relu(node: object, root: nn.Module) -> bool:
    """``node`` is the output of a quantized module that applies ReLU itself (a fused
    Conv+BN+ReLU; maybe through Identity slots)."""
    while isinstance(node, fx.Node) and node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, QuantModule) and module.output_relu:
            return True
        if type(module) is not nn.Identity:
            return False
        node = node.args[0] if node.args else None
    return False


def _sole_relu_user(node: fx.Node, root: nn.Module) -> fx.Node | None:
    """The ReLU that is ``node``'s only user (in ``root``'s own code), if there is one."""
    users = list(node.users)
    if len(users) == 1 and not owner_of(users[0]) and is_relu(users[0], root):
        return users[0]
    return None


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def rewrite_module(owner: nn.Module, build: Build) -> fx.GraphModule | None:
    """``owner`` as a GraphModule whose functional ops call the modules ``build`` makes.

    ``build(op, name)`` returns the module for ``op`` (to be registered as ``name``) or None to
    leave the op float. ReLUs applied to the output of a fused Conv+BN+ReLU are dropped
    (``relu(relu(x)) == relu(x)``). Returns None when nothing changes; tracing errors propagate,
    and a forward with optional arguments, or one whose graph depends on the training mode
    or grad mode, raises `ArgumentDependentGraph` (not rewritten).
    """
    check_rewritable(owner)
    before = set(vars(owner))
    try:
        graph = _trace_leaves(owner)
        relus = [
            n
            for n in graph.nodes
            if not owner_of(n) and is_relu(n, owner) and _after_fused_relu(n.args[0], owner)
        ]
        ops = own_ops(graph)
        if not ops and not relus:
            return None
        check_mode_independent(owner, graph)
        gm = RewrittenBlock(owner, graph, class_name=type(owner).__name__)
    finally:
        for name in set(vars(owner)) - before:  # tensor constants the tracer stored
            delattr(owner, name)
    taken = set(dir(gm)) | set(vars(owner)) | set(owner._modules)
    added: dict[str, nn.Module] = {}
    for op in ops:
        name = _unique(op.kind, taken)
        module = build(op, name)
        if module is None:
            continue
        added[name] = module.train(owner.training)  # in the block's mode (eval: no observing)
        gm.add_submodule(name, module)
        with graph.inserting_before(op.node):
            args, kwargs = op.call
            call = graph.call_module(name, args, kwargs)
        call.meta = dict(op.node.meta)
        relu = _sole_relu_user(op.node, owner) if hasattr(module, "fused_relu") else None
        op.node.replace_all_uses_with(call)
        graph.erase_node(op.node)
        if relu is not None:  # add-then-ReLU: the add applies it before its quantizer
            module.fused_relu = True
            relus.append(relu)
            relu.replace_all_uses_with(call)
            graph.erase_node(relu)
    for relu in relus:
        if getattr(relu, "_erased", False):
            continue  # already folded into an add
        relu.replace_all_uses_with(relu.args[0])
        graph.erase_node(relu)
    if not added and not relus:
        return None
    graph.lint()
    gm.recompile()
    _adopt_state(gm, owner, added)
    # A ReLU module whose every call was folded away is dead code: an Identity, so it is not
    # quantized (and left uncalibrated) for nothing.
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    for relu in relus:
        target = relu.target if relu.op == "call_module" else None
        if target and "." not in target and target not in called:
            gm._modules[target] = nn.Identity()
    return gm


def _adopt_state(gm: fx.GraphModule, owner: nn.Module, added: dict[str, nn.Module]) -> None:
    """Give ``gm`` exactly ``owner``'s children, parameters, buffers and hooks (same objects,
    same order: unused ones too), plus the new modules."""
    gm._modules = {**owner._modules, **added}
    gm._parameters = dict(owner._parameters)
    constants = {k: v for k, v in gm._buffers.items() if k not in owner._buffers}
    gm._buffers = {**owner._buffers, **constants}
    # Tensor constants of forward (now buffers of gm) are not state: keep them out of state_dict.
    gm._non_persistent_buffers_set = set(owner._non_persistent_buffers_set) | set(constants)
    gm.training = owner.training
    for key, value in vars(owner).items():
        if key in ("forward", "_compiled_call_impl"):
            continue  # an instance-level forward would bypass the rewritten code
        if "hook" in key or key not in gm.__dict__:
            gm.__dict__[key] = value  # hooks, and plain attributes (block.stride, ...)
