"""Calibration helpers: run training batches through the model without changing it."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
from torch import nn

from qat_lightning.export.example_input import ExampleInput
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
    """Remembers the arguments, positional and keyword, of the first call of the
    LightningModule's forward (or, if training_step calls a child directly, of the outermost
    child holding quantized layers): tensors detached, on CPU, cut to their first 2 rows
    along the batch. A call whose arguments an export cannot take (a string, a nested list)
    is not captured (nor, then, a child's call instead); `finish` says why."""

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.seen: dict[str, ExampleInput] = {}
        self.refused: dict[str, str] = {}
        self.order: list[str] = []
        self.handles = []
        candidates = [("", pl_module)] + [
            (name, child) for name, child in pl_module.named_children() if is_quantized(child)
        ]
        for name, module in candidates:
            self.handles.append(
                module.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            )

    def _hook(self, name: str):
        # Eager also in a compiled training_step: it only keeps tensors, and traced, its
        # checks of ``name`` and ``seen`` would recompile it for every module and batch.
        @torch.compiler.disable
        def hook(module, args, kwargs):
            if name in self.seen or name in self.refused:
                return
            example = ExampleInput(tuple(args), dict(kwargs))
            try:
                example.check(
                    f"{type(module).__name__}.forward was called with arguments "
                    "an export cannot take"
                )
            except ValueError as error:
                self.refused[name] = str(error)
                return
            self.seen[name] = example.snapshot()
            self.order.append(name)

        return hook

    def finish(self) -> tuple[ExampleInput | None, str | None, str | None]:
        """``(example, export target name, why nothing was captured)``."""
        for handle in self.handles:
            handle.remove()
        if "" in self.seen:
            return self.seen[""], "", None
        if "" in self.refused:  # its forward ran: a child's arguments are not the model's
            return None, None, self.refused[""]
        if self.order:
            return self.seen[self.order[0]], self.order[0], None
        return None, None, self.refused.get("") or next(iter(self.refused.values()), None)
