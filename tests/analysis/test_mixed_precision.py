"""`mixed_precision`: the exact least-cost bit widths under a size budget, against brute force."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import QATCallback
from qat_lightning.analysis import (
    LayerSensitivity,
    SensitivityResult,
    mixed_precision,
    sensitivity,
)
from qat_lightning.nn import QuantModule
from qat_lightning.surgery import QuantConfig, quantize_model


def _result(layers: list[tuple[int, dict[int, float]]]) -> SensitivityResult:
    """A result from (numel, {bits: metric delta}) per layer."""
    entries, numel = [], {}
    for i, (n, deltas) in enumerate(layers):
        numel[f"l{i}"] = n
        for bits, delta in deltas.items():
            entries.append(LayerSensitivity(f"l{i}", "params", bits, 10.0, 1.0 + delta, delta))
    bits = tuple(sorted({b for _, d in layers for b in d}))
    return SensitivityResult(entries, 1.0, numel, bits, ("params",))


layer = st.tuples(
    st.integers(1, 3000),
    st.dictionaries(
        st.sampled_from([2, 3, 4, 8]),
        st.floats(-1.0, 0.2, allow_nan=False),
        min_size=1,
        max_size=3,
    ),
)


@settings(max_examples=150, deadline=None)
@given(layers=st.lists(layer, min_size=1, max_size=5), budget=st.floats(0.01, 1.0))
def test_the_choice_is_the_brute_force_optimum(layers, budget) -> None:
    result = _result(layers)
    fp32 = 4 * sum(n for n, _ in layers)
    limit = int(budget * fp32 * 8 + 1e-9)  # bits
    best = None
    for combo in itertools.product(*[sorted(d.items()) for _, d in layers]):
        size = sum(n * b for (n, _), (b, _) in zip(layers, combo, strict=True))
        cost = sum(-delta for _, delta in combo)
        if size <= limit and (best is None or cost < best):
            best = cost
    if best is None:
        with pytest.raises(ValueError, match="infeasible"):
            mixed_precision(result, budget)
        return
    choice = mixed_precision(result, budget)
    assert math.isclose(choice.cost, best, rel_tol=1e-9, abs_tol=1e-9)
    size = sum(n * choice.bits[f"l{i}"] for i, (n, _) in enumerate(layers))
    assert size <= limit and choice.size_bytes == size / 8
    assert math.isclose(
        choice.cost, sum(result.cost(n, "params", b) for n, b in choice.bits.items()), abs_tol=1e-9
    )


def test_a_budget_in_bytes_and_as_a_fraction_of_fp32_agree() -> None:
    result = _result([(100, {2: -0.5, 8: 0.0}), (300, {2: -0.1, 8: 0.0})])
    # fp32: 1600 bytes; 8 bits everywhere: 400 bytes; all at 2 bits: 100 bytes
    assert mixed_precision(result, 0.25).bits == {"l0": 8, "l1": 8}
    assert mixed_precision(result, 400).bits == {"l0": 8, "l1": 8}
    assert mixed_precision(result, 0.2).bits == {"l0": 8, "l1": 2}  # 320 bytes: the cheap drop
    assert mixed_precision(result, 320).bits == {"l0": 8, "l1": 2}


def test_where_the_metric_ties_the_budget_goes_to_the_noisiest_layer() -> None:
    """A coarse metric often moves for no single layer: the output noise decides then."""
    entries = [
        LayerSensitivity(name, "params", bits, sqnr, 1.0, 0.0)
        for name, low_sqnr in (("quiet", 20.0), ("noisy", 5.0))
        for bits, sqnr in ((2, low_sqnr), (8, 40.0))
    ]
    result = SensitivityResult(entries, 1.0, {"quiet": 100, "noisy": 100}, (2, 8), ("params",))
    # 8 bits for one layer, 2 for the other: 125 bytes of 800 fp32
    assert mixed_precision(result, 125).bits == {"quiet": 2, "noisy": 8}
    assert mixed_precision(result, 124).bits == {"quiet": 2, "noisy": 2}


def test_an_infeasible_budget_names_the_budget_and_the_smallest_size() -> None:
    result = _result([(100, {2: -0.5, 8: 0.0}), (300, {4: -0.1, 8: 0.0})])
    # smallest: 100*2/8 + 300*4/8 = 175 bytes
    with pytest.raises(
        ValueError, match=r"budget=0\.1\) is infeasible.*smallest achievable size, 175 bytes"
    ):
        mixed_precision(result, 0.1)
    for bad in (0, -1, True, "0.1"):
        with pytest.raises(ValueError, match=rf"budget={bad!r}\) is invalid"):
            mixed_precision(result, bad)


def test_fifty_layers_solve_exactly_and_fast() -> None:
    rng = random.Random(0)
    layers = [
        (rng.randint(100, 2_000_000), {b: -rng.random() / b for b in (2, 4, 8)}) for _ in range(50)
    ]
    start = time.perf_counter()
    choice = mixed_precision(_result(layers), 0.15)
    assert time.perf_counter() - start < 5.0
    assert choice.size_bytes <= 0.15 * choice.fp32_bytes
    # any single-layer change that still fits costs at least as much (the optimum is local too)
    for name, bits in choice.bits.items():
        i = int(name[1:])
        for other, delta in layers[i][1].items():
            size = choice.size_bytes + layers[i][0] * (other - bits) / 8
            if size <= 0.15 * choice.fp32_bytes:
                assert -delta >= -layers[i][1][bits] - 1e-12


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).eval()


def test_overrides_go_into_quantize_model_and_the_callback_as_they_are() -> None:
    model = _cnn()
    result = sensitivity(model, [torch.randn(4, 3, 8, 8)], bits=(2, 4, 8), which=("params",))
    choice = mixed_precision(result, 0.12)
    assert set(choice.bits) == {"0", "3", "6"}  # the fused conv+bn keeps the conv's name
    assert len(set(choice.bits.values())) > 1
    QATCallback(overrides=choice.overrides)  # accepted as it is
    quantize_model(model, QuantConfig(overrides=choice.overrides))
    for name, bits in choice.bits.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantModule)
        assert module.param_quantizers["weight"].scheme.bits == bits


# -- activation bits: a second budget, bytes of quantized activations per sample -------------
def _two_sided(
    layers: list[tuple[int, dict[int, float], int, dict[int, float]]],
) -> SensitivityResult:
    """A result from (weight numel, {bits: delta}, activation numel, {bits: delta}) per layer;
    a weight numel of 0 is a layer without weights (a pool, an add)."""
    entries, wnumel, anumel = [], {}, {}
    for i, (wn, wdeltas, an, adeltas) in enumerate(layers):
        name = f"l{i}"
        anumel[name] = an
        if wn:
            wnumel[name] = wn
            for bits, delta in wdeltas.items():
                entries.append(LayerSensitivity(name, "params", bits, 10.0, 1.0 + delta, delta))
        for bits, delta in adeltas.items():
            entries.append(LayerSensitivity(name, "inputs", bits, 10.0, 1.0 + delta, delta))
    bits = tuple(sorted({e.bits for e in entries}))
    return SensitivityResult(entries, 1.0, wnumel, bits, ("params", "inputs"), anumel)


deltas = st.dictionaries(
    st.sampled_from([2, 4, 8]), st.floats(-1.0, 0.2, allow_nan=False), min_size=1, max_size=3
)
two_sided_layer = st.tuples(st.integers(0, 2000), deltas, st.integers(1, 2000), deltas)


@settings(max_examples=150, deadline=None)
@given(
    layers=st.lists(two_sided_layer, min_size=1, max_size=4),
    budget=st.floats(0.01, 1.0),
    activation_budget=st.floats(0.01, 1.0),
)
def test_weight_and_activation_bits_are_the_joint_brute_force_optimum(
    layers, budget, activation_budget
) -> None:
    if not any(wn for wn, _, _, _ in layers):
        layers = [(1, {8: 0.0}, *layers[0][2:]), *layers[1:]]
    result = _two_sided(layers)
    wlimit = int(budget * 4 * sum(wn for wn, *_ in layers) * 8 + 1e-9)
    alimit = int(activation_budget * 4 * sum(an for _, _, an, _ in layers) * 8 + 1e-9)
    # every (weight bits, activation bits) per layer, jointly: the least summed cost with
    # both budgets met
    per_layer = [
        [
            (wn * wb if wn else 0, an * ab, (-wd if wn else 0.0) - ad)
            for wb, wd in (sorted(wd_.items()) if wn else [(0, 0.0)])
            for ab, ad in sorted(ad_.items())
        ]
        for wn, wd_, an, ad_ in layers
    ]
    best = None
    for combo in itertools.product(*per_layer):
        if sum(c[0] for c in combo) <= wlimit and sum(c[1] for c in combo) <= alimit:
            cost = sum(c[2] for c in combo)
            best = cost if best is None else min(best, cost)
    if best is None:
        with pytest.raises(ValueError, match=r"budget=.*infeasible"):
            mixed_precision(result, budget, activation_budget=activation_budget)
        return
    choice = mixed_precision(result, budget, activation_budget=activation_budget)
    assert math.isclose(choice.cost + choice.activation_cost, best, abs_tol=1e-9)
    wsize = sum(layers[int(n[1:])][0] * b for n, b in choice.bits.items())
    asize = sum(layers[int(n[1:])][2] * b for n, b in choice.activation_bits.items())
    assert wsize <= wlimit and choice.size_bytes == wsize / 8
    assert asize <= alimit and choice.activation_bytes == asize / 8
    assert set(choice.activation_bits) == {f"l{i}" for i in range(len(layers))}
    # overrides: every layer once, in module order, each side where it was chosen
    assert list(choice.overrides) == [f"l{i}" for i in range(len(layers))]
    for name, change in choice.overrides.items():
        assert change["inputs"] == {"bits": choice.activation_bits[name]}
        assert change.get("params") == (
            {"bits": choice.bits[name]} if name in choice.bits else None
        )


def test_without_an_activation_budget_only_weights_are_chosen() -> None:
    result = _two_sided([(100, {2: -0.5, 8: 0.0}, 50, {2: -0.9, 8: 0.0})])
    choice = mixed_precision(result, 1.0)
    assert choice.activation_bits == {} and choice.activation_bytes is None
    assert choice.overrides == {"l0": {"params": {"bits": 8}}}
    assert "activation_bits" not in choice.to_dict()


def test_an_activation_budget_in_bytes_and_as_a_fraction_agree() -> None:
    # activations: 100 + 300 elements per sample, fp32 1600 bytes; 8 bits everywhere: 400
    result = _two_sided(
        [(10, {8: 0.0}, 100, {2: -0.5, 8: 0.0}), (10, {8: 0.0}, 300, {2: -0.1, 8: 0.0})]
    )
    for budget in (0.2, 320):
        choice = mixed_precision(result, 1.0, activation_budget=budget)
        assert choice.activation_bits == {"l0": 8, "l1": 2}  # 100 + 75 bytes
        assert choice.activation_bytes == 175 and choice.activation_fp32_bytes == 1600
    with pytest.raises(ValueError, match=r"activation_budget=0\.05\) is infeasible.*100 bytes"):
        mixed_precision(result, 1.0, activation_budget=0.05)
    with pytest.raises(ValueError, match=r"activation_budget=-1\) is invalid"):
        mixed_precision(result, 1.0, activation_budget=-1)


def test_an_activation_budget_needs_the_inputs_side_measured() -> None:
    result = _result([(100, {2: -0.5, 8: 0.0})])
    with pytest.raises(ValueError, match=r"activation_budget.*no activations measured.*'inputs'"):
        mixed_precision(result, 1.0, activation_budget=0.5)


def test_sensitivity_counts_activation_elements_per_sample_and_overrides_set_them() -> None:
    model = _cnn()
    results = [sensitivity(model, [torch.randn(n, 3, 8, 8)], bits=(2, 4, 8)) for n in (2, 5)]
    assert results[0].activation_numel == results[1].activation_numel  # per sample
    numel = results[0].activation_numel
    # the fused conv+bn+relu quantizes its input (3x8x8) and its output (8x8x8); the head
    # its 10 logits
    assert numel["0"] == 3 * 8 * 8 + 8 * 8 * 8 and numel["6"] == 10
    choice = mixed_precision(results[0], 0.12, activation_budget=0.15)
    assert choice.activation_bytes <= 0.15 * choice.activation_fp32_bytes
    quantize_model(model, QuantConfig(overrides=choice.overrides))
    for name, bits in choice.activation_bits.items():
        module = model.get_submodule(name)
        assert [q.scheme.bits for q in module.output_quantizers if q is not None] == [bits]
