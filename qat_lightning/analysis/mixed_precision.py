"""`mixed_precision`: per-layer weight bit widths that fit a size budget at the least summed cost.

The choice is an exact multiple-choice knapsack: each layer takes one of the measured bit
widths, a choice costs ``numel * bits`` bits of size and `SensitivityResult.cost` of accuracy,
and the total size must stay within the budget (ties of the cost go to the least summed
output noise ratio). Sizes are integers (bits), so a dynamic
program over the Pareto front of (size, cost) pairs, layer by layer, is exact: a partial choice
that is both larger and costlier than another can never be part of the best one, and every
other partial choice is kept. The front never holds more pairs than there are distinct sizes
under the budget; for ~50 layers and three widths it stays small (milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qat_lightning.analysis.result import SensitivityResult

Cost = tuple[float, float]


@dataclass(frozen=True)
class MixedPrecisionResult:
    """The bit widths `mixed_precision` chose.

    Attributes:
        bits: per layer (module order), the weight bit width.
        size_bytes: the weights' size at those widths (``sum(numel * bits) / 8``).
        budget_bytes: the budget, in bytes.
        fp32_bytes: the same weights in float32.
        cost: the summed `SensitivityResult.cost` of the choice.
    """

    bits: dict[str, int]
    size_bytes: float
    budget_bytes: float
    fp32_bytes: int
    cost: float

    @property
    def overrides(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"params": {"bits": b}}}``, as `QATCallback(overrides=...)`,
        `QuantConfig(overrides=...)` and `quantize_model` take it (in module order, so a
        layer's own entry comes after any layer that contains it and wins)."""
        return {name: {"params": {"bits": b}} for name, b in self.bits.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": dict(self.bits),
            "size_bytes": self.size_bytes,
            "budget_bytes": self.budget_bytes,
            "fp32_bytes": self.fp32_bytes,
            "size_fraction_of_fp32": self.size_bytes / self.fp32_bytes,
            "cost": self.cost,
        }


def budget_bytes(budget: float, fp32_bytes: int) -> float:
    """``budget`` in bytes: a fraction of ``fp32_bytes`` when ``0 < budget <= 1``, else bytes."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(
            f"mixed_precision(budget={budget!r}) is invalid: allowed a fraction of the fp32 "
            "weight size in (0, 1] or a number of bytes > 1"
        )
    return float(budget) * fp32_bytes if budget <= 1 else float(budget)


def mixed_precision(result: SensitivityResult, budget: float) -> MixedPrecisionResult:
    """Choose each layer's weight bit width to fit ``budget`` while minimizing the summed cost.

    Args:
        result: a `sensitivity` result measured with ``"params"`` in ``which``. Its layers
            with weights are the ones chosen for; layers it does not list are not counted.
        budget: the weights' size: a fraction of their fp32 size when ``0 < budget <= 1``
            (``0.15``), otherwise bytes.

    Returns:
        a `MixedPrecisionResult`; pass its ``overrides`` to `QATCallback` or `quantize_model`.

    Raises:
        ValueError: if the budget is not positive, the result has no weights measured, or
            the budget is below the smallest size the measured widths reach.

    Example:
        >>> choice = mixed_precision(sensitivity(model, batches, metric), budget=0.15)
        >>> QATCallback(overrides=choice.overrides)
    """
    layers = [n for n in result.layers if n in result.weight_numel]
    # per layer: (size in bits, (cost, output noise ratio), bits); the noise ratio breaks ties
    # of the cost (a coarse metric often does not move for one layer), so where the metric
    # cannot tell choices apart the budget still goes to the layers whose outputs need it
    options: list[list[tuple[int, Cost, int]]] = []
    for name in layers:
        numel = result.weight_numel[name]
        measured = [e for e in result.entries if e.name == name and e.side == "params"]
        options.append(
            [
                (numel * e.bits, (result.cost(name, "params", e.bits), e.noise_ratio), e.bits)
                for e in measured
            ]
        )
    if not layers:
        raise ValueError(
            "mixed_precision: the sensitivity result has no layer with weights measured; "
            "run sensitivity with 'params' in which"
        )
    fp32 = 4 * sum(result.weight_numel[n] for n in layers)
    limit_bytes = budget_bytes(budget, fp32)
    limit_bits = int(limit_bytes * 8 + 1e-9)
    smallest = sum(min(size for size, _, _ in choices) for choices in options)
    if smallest > limit_bits:
        raise ValueError(
            f"mixed_precision(budget={budget!r}) is infeasible: {limit_bytes:g} bytes of "
            f"weights is below the smallest achievable size, {smallest / 8:g} bytes "
            f"({smallest / 8 / fp32:.4f} of fp32, every layer at its lowest measured width); "
            f"allowed a budget >= {smallest / 8:g} bytes"
        )
    picks = _solve(options, limit_bits)
    bits = {name: options[i][k][2] for i, (name, k) in enumerate(zip(layers, picks, strict=True))}
    size = sum(options[i][k][0] for i, k in enumerate(picks))
    cost = sum(options[i][k][1][0] for i, k in enumerate(picks))
    return MixedPrecisionResult(bits, size / 8, limit_bytes, fp32, cost)


def _solve(options: list[list[tuple[int, Cost, int]]], limit: int) -> list[int]:
    """Indices of the chosen option per layer: least summed cost with summed size <= limit.

    Costs are pairs, summed elementwise and compared lexicographically (an order that adding
    the same pair keeps, so the front stays exact). The front holds (size, cost, choices)
    with sizes increasing and costs strictly decreasing; ``choices`` is a linked list
    ``(option index, previous)``.
    """
    # the least size the remaining layers need: a partial choice that leaves too little room
    # for them can never complete
    rest = [0] * (len(options) + 1)
    for i in range(len(options) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(size for size, _, _ in options[i])
    front: list[tuple[int, Cost, Any]] = [(0, (0.0, 0.0), None)]
    for i, choices in enumerate(options):
        room = limit - rest[i + 1]
        candidates = [
            (size + s, (round(cost[0] + c[0], 12), cost[1] + c[1]), (k, chain))
            for size, cost, chain in front
            for k, (s, c, _) in enumerate(choices)
            if size + s <= room
        ]
        candidates.sort(key=lambda t: (t[0], t[1]))
        front = []
        for candidate in candidates:
            if not front or candidate[1] < front[-1][1]:
                front.append(candidate)
    best = min(front, key=lambda t: (t[1], t[0]))
    picks, chain = [], best[2]
    while chain is not None:
        picks.append(chain[0])
        chain = chain[1]
    return picks[::-1]
