"""torch.fx helpers of model surgery: tracing (whole model or region by region) and the tables
of ops that surgery recognises in a graph."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat_lightning.nn import QuantModule, quant_type_for
from qat_lightning.quant import Quantizer

# Functional ops that become quantized modules (kind -> targets).
BINARY_FUNCTIONS = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
}
BINARY_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "matmul": "matmul"}
INPLACE = {operator.iadd, operator.imul, "add_", "mul_"}
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
ATTENTION_FUNCTIONS = (F.scaled_dot_product_attention,)
_ATTENTION_ARGUMENTS = ("query", "key", "value")

# Float calls whose output is some of the input's values, unchanged: on the input's grid.
# (A quantized module says so itself: `QuantModule.keeps_input_grid`.)
GRID_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.t, torch.movedim, torch.swapaxes, torch.narrow, torch.select,
    torch.chunk, torch.split, torch.unbind, torch.clone, operator.getitem,
    torch.relu, F.relu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
GRID_METHODS = {
    "flatten", "unflatten", "view", "view_as", "reshape", "reshape_as", "permute",
    "transpose", "t", "squeeze", "unsqueeze", "contiguous", "expand", "expand_as", "repeat",
    "narrow", "select", "chunk", "split", "unbind", "movedim", "swapaxes", "clone", "detach",
    "relu", "relu_", "__getitem__",
}  # fmt: skip
GRID_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
# Modules with no parameters and nothing to compute: they get no row in the report.
NO_COMPUTE = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
# Methods that return something other than a tensor.
NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "type"}


class SurgeryTracer(fx.Tracer):
    """The default leaves (torch.nn layers) plus quantized modules, quantizers and registered
    float types; with ``leaf_children`` every direct child of the traced module is a leaf too,
    so the graph holds exactly the traced module's own code."""

    def __init__(self, leaf_children: bool = False) -> None:
        super().__init__()
        self.leaf_children = leaf_children

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (QuantModule, Quantizer)) or quant_type_for(m) is not None:
            return True  # registered types are swapped whole, never traced into
        if getattr(type(m), "quantized_container", False):
            return True  # a quantized container (QuantMultiheadAttention) wires its children
        if self.leaf_children and module_qualified_name and "." not in module_qualified_name:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, leaf_children: bool = False, keep_constants: bool = False):
    """The fx graph of ``module.forward``; raises whatever tracing raises.

    Tracing stores tensor constants made inside ``forward`` as attributes of ``module``;
    unless ``keep_constants`` (a GraphModule will be built from it), they are removed again so
    that analysing a model leaves it untouched.
    """
    before = set(vars(module))
    try:
        return SurgeryTracer(leaf_children).trace(module)
    finally:
        if not keep_constants:
            for name in set(vars(module)) - before:
                delattr(module, name)


@dataclass
class Region:
    """A module traced as one graph (``graph`` is None where it did not trace: then its direct
    children are handled one by one, and each container child is a region of its own)."""

    prefix: str
    module: nn.Module
    graph: fx.Graph | None
    error: str = ""

    def full_name(self, target: str) -> str:
        return join(self.prefix, target)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def trace_regions(module: nn.Module, prefix: str = "") -> list[Region]:
    """Trace ``module``; where that fails, trace each container child instead, recursively."""
    try:
        return [Region(prefix, module, trace(module))]
    except Exception as err:  # tracing user code can fail in any way
        message = error_line(err)
        regions = [Region(prefix, module, None, message)]
    for name, child in module.named_children():
        if (
            len(child._modules)
            and not isinstance(child, QuantModule)
            and quant_type_for(child) is None
        ):
            regions += trace_regions(child, join(prefix, name))
    return regions


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (fx errors can carry a whole graph)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def module_stack(node: fx.Node) -> list[str]:
    """Qualified names of the modules whose forward was running when ``node`` was recorded,
    outermost first (relative to the traced module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]


def owner_of(node: fx.Node) -> str:
    """Relative name of the module whose own ``forward`` code made ``node`` ('' = the root)."""
    stack = module_stack(node)
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


class TensorGuess:
    """Whether a node's value is (probably) a tensor rather than a shape, int or tuple."""

    def __init__(self) -> None:
        self._memo: dict[fx.Node, bool] = {}

    def __call__(self, node: object) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node not in self._memo:
            self._memo[node] = self._guess(node)
        return self._memo[node]

    def _guess(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "get_attr", "call_module"):
            return True
        if node.op == "call_method":
            return node.target not in NON_TENSOR_METHODS and self(node.args[0])
        if node.op == "call_function":
            if node.target is getattr:
                return False  # x.shape, x.dtype, ...
            if node.target is operator.getitem or getattr(node.target, "__module__", "") in (
                "_operator",
                "operator",
            ):
                return any(self(a) for a in node.args)
            return True
        return False


@dataclass
class FunctionalOp:
    """A functional op that becomes a quantized module."""

    node: fx.Node
    kind: str  # "add", "mul", "matmul", "cat" or "sdpa"
    dim: int = 0

    @property
    def operands(self) -> list[fx.Node]:
        """The tensor inputs, read from the node now (earlier rewrites may have renamed them);
        for attention: query, key, value (the mask is an argument, not a quantized input)."""
        if self.kind == "cat":
            return list(self.node.args[0] if self.node.args else self.node.kwargs["tensors"])
        if self.kind == "sdpa":
            args, kwargs = self.node.args, self.node.kwargs
            return [args[i] if i < len(args) else kwargs.get(n) for i, n in
                    enumerate(_ATTENTION_ARGUMENTS)]  # fmt: skip
        return list(self.node.args)

    @property
    def call(self) -> tuple[tuple, dict]:
        """The arguments of the module call that replaces the node: ``(args, kwargs)``."""
        if self.kind == "cat":
            return (list(self.operands),), {}
        if self.kind == "sdpa":  # the module takes the function's own arguments
            return tuple(self.node.args), dict(self.node.kwargs)
        return tuple(self.operands), {}

    @property
    def label(self) -> str:
        target = self.node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        return f"Tensor.{name}()" if self.node.op == "call_method" else f"{name}()"


def functional_op(node: fx.Node, is_tensor: TensorGuess) -> FunctionalOp | None:
    """``node`` as a functional op on activation tensors that surgery can quantize, or None."""
    kind = None
    if node.op == "call_function" and node.target in CAT_FUNCTIONS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        extra = set(node.kwargs) - {"tensors", "dim"}
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or extra:
            return None
        op = FunctionalOp(node, "cat", dim)
    elif node.op == "call_function" and node.target in ATTENTION_FUNCTIONS:
        op = FunctionalOp(node, "sdpa")
    else:
        if node.op == "call_function" and node.target in BINARY_FUNCTIONS:
            kind = BINARY_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in BINARY_METHODS:
            kind = BINARY_METHODS[node.target]
        if kind is None or len(node.args) != 2 or node.kwargs:  # alpha=, out=: leave float
            return None
        op = FunctionalOp(node, kind)
    if not op.operands or not all(
        is_tensor(a) and a.op != "get_attr" for a in op.operands
    ):  # a parameter or buffer operand is a weight, not an activation: leave it float
        return None
    if node.target in INPLACE and not _last_use(op.operands[0], node):
        return None  # later code reads the mutated tensor: an out-of-place module would differ
    return op


def _last_use(value: fx.Node, node: fx.Node) -> bool:
    """True if no user of ``value`` comes after ``node`` in the graph."""
    later = set()
    cursor = node.next
    while cursor.op != "root":
        later.add(cursor)
        cursor = cursor.next
    return not any(user in later for user in value.users)


def is_relu(node: fx.Node, root: nn.Module) -> bool:
    """``node`` applies a plain ReLU (module, function or method)."""
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")
