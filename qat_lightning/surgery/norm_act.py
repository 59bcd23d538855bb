"""BatchNorms that carry their activation (timm's ``BatchNormAct2d``), split before surgery.

timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` subclass whose ``forward`` is BatchNorm, then
its ``drop`` child, then its ``act`` child. Surgery cannot swap it as a BatchNorm (its
``forward`` is its own, so the registry leaves it float), and cannot fold it into the conv
before it. `split_norm_acts` replaces each one by a `BatchNormAct` container: ``bn``, a plain
BatchNorm of the same hyperparameters sharing the original's parameters and buffers, then its
``drop`` and ``act`` children where they do something (an ``Identity`` is left out). The rest of
surgery then sees what the layer computes: after a conv the BatchNorm folds into it (with a
ReLU fused as well), and where no conv precedes it (timm's DenseNet pre-activation
``norm -> act -> conv``) it is the per-channel integer affine (`qat_lightning.nn.batchnorm`)
followed by the quantized activation.

The state-dict keys of such a layer move from ``<name>.weight`` to ``<name>.bn.weight``
(the report's ``renamed`` says so). A layer matching a skip pattern is not split (it stays
float, as it was). Which classes are split is `register_norm_act`'s list (a class whose
``forward`` is exactly BatchNorm -> ``drop`` -> ``act``); timm's is registered by name, so
timm is never imported here.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qat_lightning.surgery.config import QuantConfig

# (module path, class name) of a BatchNorm subclass -> the plain BatchNorm class it computes
_NORM_ACTS: dict[tuple[str, str], type[_BatchNorm]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): nn.BatchNorm2d,
}


def register_norm_act(module_path: str, class_name: str, plain: type[_BatchNorm]) -> None:
    """Split instances of ``module_path.class_name`` (a subclass of ``plain`` whose forward is
    ``plain``'s, then its ``drop`` child, then its ``act`` child) before surgery.

    Example:
        >>> register_norm_act("mylib.layers", "BnAct1d", nn.BatchNorm1d)
    """
    if not (isinstance(plain, type) and issubclass(plain, _BatchNorm)):
        raise ValueError(
            f"register_norm_act: plain={plain!r} is not a BatchNorm class; allowed "
            "nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d"
        )
    _NORM_ACTS[(module_path, class_name)] = plain


def _plain_type(module: nn.Module) -> type[_BatchNorm] | None:
    """The plain BatchNorm class ``module`` is split into, or None if it is not a norm-act."""
    cls = type(module)
    plain = _NORM_ACTS.get((cls.__module__, cls.__qualname__))
    if plain is None or not isinstance(module, plain):
        return None
    return plain


class BatchNormAct(nn.Sequential):
    """A norm-act layer split: ``bn`` (a plain BatchNorm sharing the original's tensors), then
    its ``drop`` and ``act`` where they are not ``Identity``."""


def _split(module: _BatchNorm, plain: type[_BatchNorm]) -> BatchNormAct:
    bn = plain(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # its tensors are the original's, set below
    )
    bn._parameters = dict(module._parameters)
    bn._buffers = dict(module._buffers)
    bn._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    bn.train(module.training)
    parts: OrderedDict[str, nn.Module] = OrderedDict(bn=bn)
    for name in ("drop", "act"):
        child = module._modules.get(name)
        if child is not None and not isinstance(child, nn.Identity):
            parts[name] = child
    split = BatchNormAct(parts)
    split.train(module.training)
    return split


def split_norm_acts(model: nn.Module, config: QuantConfig) -> dict[str, str]:
    """Replace every registered norm-act layer of ``model`` (in place) by its `BatchNormAct`.

    Returns:
        ``{old name: new name}`` of the BatchNorms whose state-dict keys moved.
    """
    found = [
        (name, module, plain)
        for name, module in model.named_modules()
        if (plain := _plain_type(module)) is not None and config.skip_pattern(name) is None
    ]
    renamed: dict[str, str] = {}
    replaced: dict[int, BatchNormAct] = {}
    for name, module, plain in found:
        if not name:  # the root keeps its class
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _split(module, plain)
        parent_name, _, key = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[key] = replaced[id(module)]
        renamed[name] = f"{name}.bn"
    return renamed
