"""Input-quantizer pruning: each activation tensor is quantized once, by its producer.

Every quantized module is built with input quantizers. Where a module's input comes (through
ops that keep values on their grid: reshapes, getitem, dropout, identity, ReLU, max pooling)
from a quantized module's output quantizer with the same grid, the input quantizer is
redundant and is removed (``module.input_quantizers[i] = None``): the module then reads its
producer's encoding (`QuantModule.input_encoding`, which a bias needs for ``s_in * s_w``).
This is what lets an ONNX runtime fuse ``DequantizeLinear -> Conv -> QuantizeLinear`` into an
integer conv. Inputs from float land (model inputs, float modules,
other functions) keep their quantizer.
"""

from __future__ import annotations

from collections import defaultdict

from torch import fx, nn

from qat_lightning.nn import QuantModule
from qat_lightning.quant import Quantizer, QuantScheme
from qat_lightning.surgery.graph import GRID_FUNCTIONS, GRID_METHODS, GRID_MODULES, Region


def grid_key(scheme: QuantScheme | None) -> tuple | None:
    """What makes two encodings interchangeable for a consumer (not how ranges are observed)."""
    if scheme is None:
        return None
    axis = scheme.axis if scheme.per_channel else None
    return (
        scheme.bits,
        scheme.symmetric,
        scheme.signed,
        scheme.narrow_range,
        scheme.granularity,
        axis,
        scheme.representation,
        scheme.frac_bits,
        scheme.learnable,
        scheme.group_size,
        scheme.dynamic,
    )


class _Sources:
    """The quantizer that put a node's value on its grid (None: a float value)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._memo: dict[fx.Node, Quantizer | None] = {}

    def __call__(self, node: object) -> Quantizer | None:
        if not isinstance(node, fx.Node):
            return None
        if node not in self._memo:
            self._memo[node] = self._source(node)
        return self._memo[node]

    def _source(self, node: fx.Node) -> Quantizer | None:
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            if isinstance(module, QuantModule):
                out = module.output_quantizers[0] if len(module.output_quantizers) else None
                if out is not None:
                    return out
                if not module.keeps_input_grid:
                    return None
                own = module.input_quantizers[0] if len(module.input_quantizers) else None
                return own if own is not None else self(first)
            container_output = getattr(module, "container_output", None)  # quantized SDPA
            if container_output is not None:
                return container_output
            return self(first) if type(module) in GRID_MODULES else None
        if node.op == "call_function" and node.target in GRID_FUNCTIONS:
            return self(first)
        if node.op == "call_method" and node.target in GRID_METHODS:
            return self(first)
        return None


def _per_tensor(source: Quantizer | None) -> Quantizer | None:
    """A source a container may pass through reshapes and transposes: per-tensor only."""
    return None if source is None or source.scheme.per_channel else source


def _operands(node: fx.Node) -> list[object]:
    """The tensor inputs of a module call, in input-quantizer order."""
    if node.args and isinstance(node.args[0], (list, tuple)):
        return list(node.args[0])  # cat-like: one list of tensors
    return list(node.args)


def _call_sites(
    regions: list[Region],
) -> tuple[dict[int, list[list[Quantizer | None]]], dict[int, QuantModule], set[int]]:
    """Per quantized module (by id): the source quantizer of each input at each call site, the
    modules themselves, and the ids of those an untraced region may call."""
    sites: dict[int, list[list[Quantizer | None]]] = defaultdict(list)
    modules: dict[int, QuantModule] = {}
    unsure: set[int] = set()
    for region in regions:
        if region.graph is None:
            unsure.update(id(child) for child in region.module.children())
            continue
        sources = _Sources(region.module)
        for node in region.graph.nodes:
            if node.op != "call_module":
                continue
            module = region.module.get_submodule(node.target)
            if isinstance(module, QuantModule):
                modules[id(module)] = module
                sites[id(module)].append([sources(a) for a in _operands(node)])
            for child, slots in getattr(module, "input_slots", list)():  # a container's
                operands = [sources(a) for a in _operands(node)]
                modules[id(child)] = child
                sites[id(child)].append(
                    [_per_tensor(operands[i]) if i is not None and i < len(operands) else None
                     for i in slots]
                )  # fmt: skip
    return sites, modules, unsure


def prune_input_quantizers(regions: list[Region]) -> int:
    """Remove redundant input quantizers of the quantized modules called in traced regions.

    A module's input ``i`` loses its quantizer only if, at *every* call site, that input comes
    from a quantizer with the same grid (looking through float ops that keep the grid, and
    through quantized modules without an output quantizer whose ``keeps_input_grid`` says
    their output stays on their input's grid, e.g. max pools). Modules that an untraced
    region may call directly keep everything. Returns how many were removed.
    """
    sites, modules, unsure = _call_sites(regions)
    pruned: list[tuple[int, int]] = []
    for key, module in modules.items():
        if key in unsure:
            continue
        for i, quantizer in enumerate(module.input_quantizers):
            if quantizer is None:
                continue
            wanted = grid_key(quantizer.scheme)
            producers = [site[i] if i < len(site) else None for site in sites[key]]
            if all(p is not None and grid_key(p.scheme) == wanted for p in producers):
                module.input_quantizers[i] = None
                pruned.append((key, i))
    # Record each pruned input's producer from sources traced again *after* pruning: behind a
    # max pool whose own input quantizer just went, the owner is the max pool's producer.
    sites, _, _ = _call_sites(regions)
    for key, i in pruned:
        producers = [site[i] if i < len(site) else None for site in sites[key]]
        if producers and all(p is producers[0] for p in producers):
            modules[key].set_input_source(i, producers[0])
    return len(pruned)
