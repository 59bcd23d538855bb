"""The quantized-module protocol, checked on one instance of every family.

What surgery, the optimizer, checkpoints and export rely on: a quantized module *is* its float
type, shares its Parameter objects, trains through fake quantization, and survives state_dict,
deepcopy and dtype moves with the same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_cases import (
    CASES,
    INT8_ACT,
    SCHEMES,
    Case,
    build,
    calibrate,
    cases_with_params,
    output_grid,
    quantize_inputs,
    tensors_of,
)

from qat_lightning.nn import QUANT_MODULES, QuantModule

INT8, INT8_W = SCHEMES["int8"]


def float_inputs(case: Case, args) -> list[tuple[int, torch.Tensor]]:
    return [(i, t) for i, t in enumerate(tensors_of(case, args)) if t.is_floating_point()]


def sample(case: Case, batch: int = 8, seed: int = 3):
    return case.inputs(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_is_registered_float_subclass_sharing_parameters(case: Case) -> None:
    float_module = case.make_float()
    assert QUANT_MODULES[type(float_module)] is case.quant_type
    q = case.quant_type.from_float(float_module, INT8, INT8_W)
    assert isinstance(q, type(float_module)) and isinstance(q, QuantModule)
    for name, param in float_module.named_parameters():
        assert getattr(q, name) is param
    back = q.to_float()
    assert type(back) is type(float_module)
    assert not isinstance(back, QuantModule)
    assert {n: id(p) for n, p in back.named_parameters()} == {
        n: id(p) for n, p in float_module.named_parameters()
    }
    args = sample(case)
    with torch.no_grad():
        torch.testing.assert_close(back(*args), float_module(*args), rtol=0, atol=0)


@pytest.mark.parametrize("case", cases_with_params(), ids=repr)
def test_optimizer_built_before_swap_trains_quantized_module(case: Case) -> None:
    torch.manual_seed(0)
    float_module = case.make_float()
    optimizer = torch.optim.SGD(float_module.parameters(), lr=0.1)
    q = calibrate(case.quant_type.from_float(float_module, INT8, INT8_W), case).train()
    before = {n: p.detach().clone() for n, p in q.named_parameters() if n in case.params}
    out = q(*sample(case))
    (out.float() ** 2).mean().backward()
    for name in case.params:
        grad = getattr(q, name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
    optimizer.step()
    for name in case.params:
        assert not torch.equal(getattr(q, name).detach(), before[name]), f"{name} not updated"
        assert getattr(float_module, name) is getattr(q, name)


@pytest.mark.parametrize("case", [c for c in CASES if not c.params], ids=repr)
def test_gradient_reaches_inputs_of_parameterless_modules(case: Case) -> None:
    q = calibrate(build(case, INT8, INT8_W), case).train()
    args = sample(case)
    for t in tensors_of(case, args):
        t.requires_grad_(True)
    q(*args).sum().backward()
    for t in tensors_of(case, args):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", ["int8", "int4", "fixed-point"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_ste_quant_then_dequant_equals_fake_quant(case: Case, scheme: str) -> None:
    q = calibrate(build(case, *SCHEMES[scheme]), case)
    for i, x in float_inputs(case, sample(case, seed=5)):
        torch.testing.assert_close(
            q.input_dequant(q.input_quant(x, i), i), q.input_quantizers[i](x), rtol=0, atol=0
        )
    for name in case.params:
        if q.param_quantizers[name] is None:
            continue
        expected = q.param_quantizers[name](getattr(q, name))
        got = q.param_dequant(q.param_quant(name), name)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _to(x, dtype: torch.dtype):
    if isinstance(x, list):
        return [_to(t, dtype) for t in x]
    return x.to(dtype) if x.is_floating_point() else x


def assert_same_outputs(a: QuantModule, b: QuantModule, case: Case, dtype=torch.float32) -> None:
    args = sample(case, batch=16, seed=11)
    moved = tuple(_to(x, dtype) for x in args)
    with torch.no_grad():
        ya, yb = a(*args), b(*moved)
        qa = a.quantized_forward(*quantize_inputs(a, case, args))
        qb = b.quantized_forward(*quantize_inputs(b, case, moved))
    assert yb.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    else:  # the same grid; float64 arithmetic may break a rounding tie the other way
        codes_a = output_grid(a).quantize(ya).codes.long()
        codes_b = output_grid(b).quantize(yb.float()).codes.long()
        assert (codes_a - codes_b).abs().max() <= 1
    assert torch.equal(qa.codes, qb.codes)
    torch.testing.assert_close(qa.scale, qb.scale, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_dict_loads_into_a_fresh_quantized_module(case: Case) -> None:
    q = calibrate(build(case, INT8, INT8_W, seed=0), case)
    fresh = build(case, INT8, INT8_W, seed=1).eval()
    fresh.load_state_dict(q.state_dict())
    assert_same_outputs(q, fresh, case)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_deepcopy_keeps_outputs_and_parameter_sharing_inside_the_copy(case: Case) -> None:
    q = calibrate(build(case, INT8, INT8_W), case)
    clone = copy.deepcopy(q)
    assert_same_outputs(q, clone, case)
    for name in case.params:
        assert getattr(clone, name) is not getattr(q, name)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float64_module_keeps_the_grid(case: Case) -> None:
    q = calibrate(build(case, INT8, INT8_W), case)
    assert_same_outputs(q, copy.deepcopy(q).to(torch.float64), case, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_calibration_sets_encodings_without_touching_parameters(case: Case) -> None:
    q = build(case, INT8_ACT, INT8_W)
    before = {n: p.detach().clone() for n, p in q.named_parameters() if n in case.params}
    calibrate(q, case)
    assert all(quantizer.is_initialized for quantizer in q.quantizers())
    for name, value in before.items():
        assert torch.equal(getattr(q, name).detach(), value)
