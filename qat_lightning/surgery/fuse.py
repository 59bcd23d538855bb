"""Find Conv/Linear + BatchNorm (+ ReLU) chains to fuse: in an fx graph, or by module order.

Which layers fuse with which BatchNorm (and ReLU) is `fused_bn_type`'s answer (the fused
families in `qat_lightning.nn.fused`); nothing here lists layer types.

Graph matching is the reliable way: the conv's output must go to the BatchNorm and nowhere
else, and each module must be called once (a module called twice cannot be fused for one call).
Module order is the fallback for models that do not trace; it trusts that a BatchNorm declared
right after a conv is applied to that conv's output, which is a guess, so it is reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx, nn

from qat_lightning.nn import fused_bn_type
from qat_lightning.surgery.config import QuantConfig
from qat_lightning.surgery.graph import Region, is_relu, join, owner_of


@dataclass
class FusionGroup:
    """One chain to fuse.

    Attributes:
        layer, bn: qualified names of the conv/linear and of its BatchNorm.
        relu: True to fuse a ReLU as well.
        relu_slot: qualified name of a ReLU module to replace by Identity (called once), or None.
        relu_owner: where the ReLU call stays (a shared ReLU module or a functional relu) and
            must be dropped from that module's code: its qualified name ('' = the root).
    """

    layer: str
    bn: str
    relu: bool = False
    relu_slot: str | None = None
    relu_owner: str | None = None


def bn_mismatch(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None if it can)."""
    fused = fused_bn_type(layer)
    if fused is None:
        return f"{type(layer).__name__} has no fused BatchNorm form"
    expected = fused._float_bn
    if type(bn) is not expected and type(bn) is not nn.SyncBatchNorm:
        return f"{type(bn).__name__} after {type(layer).__name__} (expected {expected.__name__})"
    channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    if bn.num_features != channels:
        return f"num_features={bn.num_features} differs from the layer's {channels} outputs"
    if not bn.track_running_stats or bn.running_mean is None:
        return "track_running_stats=False (folding needs running statistics)"
    return None


def _skipped(config: QuantConfig, *names: str) -> str | None:
    for name in names:
        pattern = config.skip_pattern(name)
        if pattern is not None:
            return f"{name} matches skip pattern {pattern!r}"
    return None


def plan_graph(region: Region, config: QuantConfig) -> tuple[list[FusionGroup], dict[str, str]]:
    """Fusion groups in a traced region, and why BatchNorms after a layer were not fused."""
    assert region.graph is not None
    root = region.module
    calls = Counter(
        id(root.get_submodule(n.target)) for n in region.graph.nodes if n.op == "call_module"
    )
    groups: list[FusionGroup] = []
    notes: dict[str, str] = {}
    for node in region.graph.nodes:
        if node.op != "call_module":
            continue
        layer = root.get_submodule(node.target)
        if fused_bn_type(layer) is None:
            continue
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 else None
        if bn_node is None or bn_node.op != "call_module" or bn_node.args != (node,):
            for user in users:  # say why a BatchNorm reading this layer was left alone
                if user.op == "call_module" and isinstance(
                    root.get_submodule(user.target), nn.modules.batchnorm._BatchNorm
                ):
                    notes[region.full_name(user.target)] = (
                        f"not fused: {region.full_name(node.target)}'s output has "
                        f"{len(users)} users"
                    )
            continue
        bn = root.get_submodule(bn_node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        layer_name, bn_name = region.full_name(node.target), region.full_name(bn_node.target)
        reason = bn_mismatch(layer, bn)
        if reason is None and (calls[id(layer)] > 1 or calls[id(bn)] > 1):
            reason = "the layer or the BatchNorm is called more than once"
        reason = reason or _skipped(config, layer_name, bn_name)
        if reason is not None:
            notes[bn_name] = f"not fused: {reason}"
            continue
        group = FusionGroup(layer_name, bn_name)
        if fused_bn_type(layer, relu=True) is not None:
            _match_relu(region, bn_node, calls, config, group)
        groups.append(group)
    return groups, notes


def _match_relu(
    region: Region, bn_node: fx.Node, calls: Counter, config: QuantConfig, group: FusionGroup
) -> None:
    users = list(bn_node.users)
    if len(users) != 1 or not is_relu(users[0], region.module):
        return
    relu = users[0]
    if relu.op == "call_module":
        name = region.full_name(relu.target)
        if config.skip_pattern(name) is not None:
            return
        if calls[id(region.module.get_submodule(relu.target))] == 1:
            group.relu, group.relu_slot = True, name
            return
    # A shared ReLU module or a relu function: fuse, and drop the (now idempotent) call from
    # the code that makes it where that module can be rewritten.
    group.relu = True
    group.relu_owner = region.full_name(owner_of(relu))


def plan_order(
    module: nn.Module, prefix: str, config: QuantConfig
) -> tuple[list[FusionGroup], dict[str, str]]:
    """Fusion groups among ``module``'s direct children, by declaration order."""
    children = [(n, c) for n, c in module.named_children()]
    groups: list[FusionGroup] = []
    notes: dict[str, str] = {}
    i = 0
    while i < len(children) - 1:
        (name, layer), (bn_name, bn) = children[i], children[i + 1]
        if fused_bn_type(layer) is None or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            i += 1
            continue
        layer_name, bn_name = join(prefix, name), join(prefix, bn_name)
        reason = bn_mismatch(layer, bn) or _skipped(config, layer_name, bn_name)
        if reason is not None:
            notes[bn_name] = f"not fused: {reason}"
            i += 1
            continue
        group = FusionGroup(layer_name, bn_name)
        i += 2
        relu_fuses = fused_bn_type(layer, relu=True) is not None
        if i < len(children) and relu_fuses and type(children[i][1]) is nn.ReLU:
            relu_name = join(prefix, children[i][0])
            if config.skip_pattern(relu_name) is None:
                group.relu, group.relu_slot = True, relu_name
                i += 1
        groups.append(group)
    return groups, notes
