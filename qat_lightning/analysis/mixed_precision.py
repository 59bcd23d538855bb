"""`mixed_precision`: per-layer bit widths that fit a size budget at the least summed cost.

Weights: each layer takes one of the measured weight bit widths; a choice costs
``numel * bits`` bits of size and `SensitivityResult.cost` of accuracy, and the weights' total
size must stay within ``budget`` (ties of the cost go to the least summed output noise ratio).

Activations (optional, ``activation_budget``): each layer's activation quantizers (the inputs
it quantizes itself and its output, the ``"inputs"`` side of `sensitivity`) take one of the
measured activation widths; a choice costs ``activation_numel * bits`` bits, the activation
elements one sample puts through those quantizers, so the budget bounds the quantized
activation bytes per sample (the memory traffic an inference moves between layers), and it
must hold beside the weight budget. The elements are counted on the quantizers the model has
at one width everywhere: an input fed by a quantized producer shares the producer's grid and
is counted once, at the producer (where a mixed choice gives the consumer other bits, surgery
keeps its input quantizer: it requantizes what it reads, the tensor stays the producer's).
Activation bits change no weight byte and weight bits no activation byte, and the costs add,
so the best pair of choices is the best weight choice under ``budget`` and the best
activation choice under ``activation_budget``: two exact knapsacks, one per side.

Each knapsack is exact: sizes are integers (bits), so a dynamic program over the Pareto front
of (size, cost) pairs, layer by layer, keeps every partial choice that is not both larger and
costlier than another (such a choice can never be part of the best one). The front never
holds more pairs than there are distinct sizes under the budget; for ~50 layers and three
widths it stays small (milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qat_lightning.analysis.result import SensitivityResult

Cost = tuple[float, float]
_WHAT = {"params": ("budget", "weights"), "inputs": ("activation_budget", "activations")}


@dataclass(frozen=True)
class MixedPrecisionResult:
    """The bit widths `mixed_precision` chose.

    Attributes:
        bits: per layer (module order), the weight bit width.
        size_bytes: the weights' size at those widths (``sum(numel * bits) / 8``).
        budget_bytes: the weight budget, in bytes.
        fp32_bytes: the same weights in float32.
        cost: the summed `SensitivityResult.cost` of the weight choice.
        activation_bits: per layer, the activation bit width (empty unless an
            ``activation_budget`` was given).
        activation_bytes: the quantized activations per sample at those widths
            (``sum(activation_numel * bits) / 8``); None without an activation budget.
        activation_budget_bytes: the activation budget, in bytes per sample (or None).
        activation_fp32_bytes: the same activations in float32, per sample (or None).
        activation_cost: the summed cost of the activation choice (or None).
        order: the sensitivity result's layers in module order (what `overrides` follows).
    """

    bits: dict[str, int]
    size_bytes: float
    budget_bytes: float
    fp32_bytes: int
    cost: float
    activation_bits: dict[str, int] = field(default_factory=dict)
    activation_bytes: float | None = None
    activation_budget_bytes: float | None = None
    activation_fp32_bytes: int | None = None
    activation_cost: float | None = None
    order: tuple[str, ...] = ()

    @property
    def overrides(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"params": {"bits": b}, "inputs": {"bits": a}}}`` (each side where it was
        chosen), as `QATCallback(overrides=...)`, `QuantConfig(overrides=...)` and
        `quantize_model` take it (in module order, so a layer's own entry comes after any
        layer that contains it and wins)."""
        names = list(self.bits) + [n for n in self.activation_bits if n not in self.bits]
        order = {n: i for i, n in enumerate(self.order or names)}
        overrides: dict[str, dict[str, Any]] = {}
        for name in sorted(names, key=lambda n: order.get(n, len(order))):
            change: dict[str, Any] = {}
            if name in self.bits:
                change["params"] = {"bits": self.bits[name]}
            if name in self.activation_bits:
                change["inputs"] = {"bits": self.activation_bits[name]}
            overrides[name] = change
        return overrides

    def to_dict(self) -> dict[str, Any]:
        values = {
            "bits": dict(self.bits),
            "size_bytes": self.size_bytes,
            "budget_bytes": self.budget_bytes,
            "fp32_bytes": self.fp32_bytes,
            "size_fraction_of_fp32": self.size_bytes / self.fp32_bytes,
            "cost": self.cost,
        }
        if self.activation_bytes is not None:
            values.update(
                activation_bits=dict(self.activation_bits),
                activation_bytes=self.activation_bytes,
                activation_budget_bytes=self.activation_budget_bytes,
                activation_fp32_bytes=self.activation_fp32_bytes,
                activation_fraction_of_fp32=self.activation_bytes / self.activation_fp32_bytes,
                activation_cost=self.activation_cost,
            )
        return values


def budget_bytes(budget: float, fp32_bytes: int, argument: str = "budget") -> float:
    """``budget`` in bytes: a fraction of ``fp32_bytes`` when ``0 < budget <= 1``, else bytes."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(
            f"mixed_precision({argument}={budget!r}) is invalid: allowed a fraction of the fp32 "
            "size in (0, 1] or a number of bytes > 1"
        )
    return float(budget) * fp32_bytes if budget <= 1 else float(budget)


def mixed_precision(
    result: SensitivityResult, budget: float, activation_budget: float | None = None
) -> MixedPrecisionResult:
    """Choose each layer's weight (and optionally activation) bit width within the budgets,
    minimizing the summed cost.

    Args:
        result: a `sensitivity` result measured with ``"params"`` in ``which`` (and
            ``"inputs"`` for an activation budget). Its layers with weights are the ones
            chosen for; layers it does not list are not counted.
        budget: the weights' size: a fraction of their fp32 size when ``0 < budget <= 1``
            (``0.15``), otherwise bytes.
        activation_budget: None (weights only), or the quantized activations' size per
            sample over the layers' activation quantizers: a fraction of their fp32 size
            when ``0 < activation_budget <= 1`` (``0.25`` is 8 bits on average), otherwise
            bytes per sample.

    Returns:
        a `MixedPrecisionResult`; pass its ``overrides`` to `QATCallback` or `quantize_model`.

    Raises:
        ValueError: if a budget is not positive, the result lacks the side a budget asks
            for, or a budget is below the smallest size the measured widths reach.

    Example:
        >>> choice = mixed_precision(sensitivity(model, batches, metric), budget=0.15)
        >>> QATCallback(overrides=choice.overrides)
    """
    weights = _choose(result, "params", budget)
    order = tuple(result.layers)
    if activation_budget is None:
        return MixedPrecisionResult(*weights, order=order)
    acts = _choose(result, "inputs", activation_budget)
    return MixedPrecisionResult(*weights, *acts, order=order)


def _choose(
    result: SensitivityResult, side: str, budget: float
) -> tuple[dict[str, int], float, float, int, float]:
    """(bits per layer, size bytes, budget bytes, fp32 bytes, summed cost) of one side."""
    argument, what = _WHAT[side]
    numels = result.weight_numel if side == "params" else result.activation_numel
    measured_side = [e for e in result.entries if e.side == side]
    if not measured_side:
        raise ValueError(
            f"mixed_precision({argument}=...): the sensitivity result has no {what} measured; "
            f"run sensitivity with {side!r} in which"
        )
    layers = [n for n in result.layers if n in numels]
    if not layers:
        raise ValueError(
            f"mixed_precision({argument}=...): the sensitivity result has no element counts "
            f"of its {what} ({'weight' if side == 'params' else 'activation'}_numel); "
            "measure it with sensitivity()"
        )
    # per layer: (size in bits, (cost, output noise ratio), bits); the noise ratio breaks ties
    # of the cost (a coarse metric often does not move for one layer), so where the metric
    # cannot tell choices apart the budget still goes to the layers whose outputs need it
    options: list[list[tuple[int, Cost, int]]] = []
    for name in layers:
        numel = numels[name]
        measured = [e for e in measured_side if e.name == name]
        options.append(
            [
                (numel * e.bits, (result.cost(name, side, e.bits), e.noise_ratio), e.bits)
                for e in measured
            ]
        )
    fp32 = 4 * sum(numels[n] for n in layers)
    limit_bytes = budget_bytes(budget, fp32, argument)
    limit_bits = int(limit_bytes * 8 + 1e-9)
    smallest = sum(min(size for size, _, _ in choices) for choices in options)
    if smallest > limit_bits:
        raise ValueError(
            f"mixed_precision({argument}={budget!r}) is infeasible: {limit_bytes:g} bytes of "
            f"{what} is below the smallest achievable size, {smallest / 8:g} bytes "
            f"({smallest / 8 / fp32:.4f} of fp32, every layer at its lowest measured width); "
            f"allowed a {argument} >= {smallest / 8:g} bytes"
        )
    picks = _solve(options, limit_bits)
    bits = {name: options[i][k][2] for i, (name, k) in enumerate(zip(layers, picks, strict=True))}
    size = sum(options[i][k][0] for i, k in enumerate(picks))
    cost = sum(options[i][k][1][0] for i, k in enumerate(picks))
    return bits, size / 8, limit_bytes, fp32, cost


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
