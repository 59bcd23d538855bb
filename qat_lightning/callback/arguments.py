"""`QATCallback`'s argument checks: each mistake is one `ValueError` before training starts,
naming the argument, the value and what is allowed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qat_lightning.export.example_input import ExampleInput
from qat_lightning.surgery import QuantConfig


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"QATCallback({name}={value!r}) is invalid: allowed an integer >= 1")
    return value


def quant_config(inputs: Any, params: Any, overrides: Any, skip: Any, fuse: Any) -> QuantConfig:
    """The `QuantConfig` of the callback's scheme arguments (dicts merged over the defaults)."""
    if inputs is None and params is None:
        raise ValueError(
            "QATCallback(inputs=None, params=None) is invalid: that quantizes nothing; "
            "allowed a scheme (or dict) for at least one of them"
        )
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Sequence) or not all(isinstance(p, str) for p in skip):
        raise ValueError(f"QATCallback(skip={skip!r}) is invalid: allowed a list of glob strings")
    if overrides is not None and not hasattr(overrides, "items"):
        raise ValueError(
            f"QATCallback(overrides={overrides!r}) is invalid: allowed a dict of "
            "glob -> {'inputs': ..., 'params': ...} or None"
        )
    return QuantConfig.from_any(
        {
            "inputs": inputs,
            "params": params,
            "overrides": overrides or {},
            "skip": tuple(skip),
            "fuse": fuse,
        }
    )


def export_formats(value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):
        raise ValueError(
            f"QATCallback(export_formats={value!r}) is invalid: allowed a list of {allowed}"
        )
    bad = [f for f in value if f not in allowed]
    if bad:
        raise ValueError(
            f"QATCallback(export_formats={list(value)!r}) is invalid: "
            f"{bad[0]!r} is not one of {allowed}"
        )
    return tuple(value)


def export_dir(value: Any) -> Path | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(
            f"QATCallback(export_dir={value!r}) is invalid: allowed a path (str or "
            "os.PathLike) or None"
        )
    return Path(value) if value is not None else None


def example_input(value: Any) -> ExampleInput | None:
    """The `ExampleInput` of a tensor, tuple/list (positional), dict (keyword) or None."""
    return None if value is None else ExampleInput.parse(value, "QATCallback")
