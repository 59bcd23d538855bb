"""Calibration helpers: run training batches through the model without changing it."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
from torch import nn

from qat_lightning.nn import QuantModule


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantModule) for m in module.modules())


def non_quantizer_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer that is not quantizer state (BN statistics and the like)."""
    return {
        name: buf.clone() for name, buf in module.named_buffers() if not _is_quantizer_buffer(name)
    }


def _is_quantizer_buffer(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("input_quantizers", "output_quantizers", "param_quantizers") for p in parts)


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, buf in module.named_buffers():
        if name in saved:
            buf.copy_(saved[name])


@contextlib.contextmanager
def silenced_logging(pl_module: pl.LightningModule):
    """training_step may call self.log; during calibration those values are not training."""
    pl_module.log = lambda *args, **kwargs: None
    pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)


class InputCapture:
    """Remembers the first tensor passed to the LightningModule's forward (or, if training_step
    calls a child directly, to the outermost child holding quantized layers)."""

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.handles = []
        candidates = [("", pl_module)] + [
            (name, child) for name, child in pl_module.named_children() if is_quantized(child)
        ]
        for name, module in candidates:
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        # Eager also in a compiled training_step: it only keeps a tensor, and traced, its
        # checks of ``name`` and ``seen`` would recompile it for every module and batch.
        @torch.compiler.disable
        def hook(module, args):
            if name not in self.seen and args and torch.is_tensor(args[0]):
                self.seen[name] = args[0][:2].detach().clone().cpu()
                self.order.append(name)

        return hook

    def finish(self) -> tuple[torch.Tensor | None, str | None]:
        for handle in self.handles:
            handle.remove()
        if "" in self.seen:
            return self.seen[""], ""
        if self.order:
            return self.seen[self.order[0]], self.order[0]
        return None, None
