"""`kept_modes`: switch a model to eval (or train) for a while and give every submodule back
the mode it had.

``model.train(was_training)`` is not that: it sets one mode on every submodule, so a part the
user froze in eval mode (a frozen backbone's BatchNorm, a standalone BN frozen by the QAT
schedule) comes back in train mode, and a model that was in eval mode stays there for the
training that follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool | None = False) -> Iterator[nn.Module]:
    """Inside the block ``model`` is in ``training`` mode (eval by default; None: unchanged);
    on exit each submodule there was on entry has its own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
