"""`sensitivity`: each layer quantized alone, at each bit width, against hand-built oracles."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning.analysis import SensitivityResult, sensitivity
from qat_lightning.nn import QuantModule


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    reference, output = reference.double(), output.double()
    return 10 * math.log10(reference.pow(2).sum() / (reference - output).pow(2).sum())


def _fq_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quant, scale = amax / qmax (torch's kernel)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1) / qmax).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax - 1, qmax)


def _fq_affine(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Unsigned affine per-tensor fake quant of the range [min(lo, 0), max(hi, 0)]."""
    lo, hi, qmax = min(lo, 0.0), max(hi, 0.0), 2**bits - 1
    scale = (hi - lo) / qmax
    zero = int(min(max(-round(lo / scale), 0), qmax))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, qmax)


@settings(max_examples=10, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 1000))
def test_params_quantizes_that_layers_weights_alone(bits, seed) -> None:
    model = _mlp(seed)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(seed))
    result = sensitivity(model, [x[:32], x[32:]], bits=(bits,), which=("params",))
    with torch.no_grad():
        reference = model(x)
        for index in (0, 2):
            oracle = copy.deepcopy(model)
            oracle[index].weight.copy_(_fq_weight(oracle[index].weight, bits))
            expected = _sqnr(reference, oracle(x))
            measured = result.get(str(index), "params", bits).sqnr_db
            assert math.isclose(measured, expected, rel_tol=1e-4), (index, measured, expected)


def test_inputs_quantizes_that_layers_activations_alone() -> None:
    """The first Linear quantizes the model input and its own output (the ReLU after it takes
    that encoding); the rest, weights included, stays float."""
    model = _mlp()
    torch.manual_seed(1)
    x = torch.randn(64, 16) * 2 + 0.5
    result = sensitivity(model, [x], bits=(4,), which=("inputs",))
    with torch.no_grad():
        reference = model(x)
        hidden = model[0](x)
        fq_x = _fq_affine(x, float(x.min()), float(x.max()), 4)
        y = _fq_affine(model[0](fq_x), float(hidden.min()), float(hidden.max()), 4)
        expected = _sqnr(reference, model[2](model[1](y)))
    assert math.isclose(result.get("0", "inputs", 4).sqnr_db, expected, rel_tol=1e-4)


def _outlier_model() -> nn.Sequential:
    """Three Linear layers; the middle one has one huge weight (on a feature that is ~0, so it
    hardly changes the output), and per-tensor quantization wipes out its other weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)).eval()
    with torch.no_grad():
        model[0].weight[0] *= 1e-3
        model[0].bias[0] = 0.0
        model[1].weight[0, 0] = 10.0
    return model


def test_the_layer_with_an_outlier_ranks_most_sensitive_in_metric_and_sqnr() -> None:
    model = _outlier_model()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 8, generator=gen) for _ in range(2)]
    held_out = torch.randn(512, 8, generator=gen)
    with torch.no_grad():
        labels = model(held_out).argmax(1)

    def top1(m: nn.Module) -> float:
        return float((m(held_out).argmax(1) == labels).float().mean())

    config = {"params": {"granularity": "per_tensor"}}
    result = sensitivity(model, calib, top1, bits=(2, 8), which=("params",), config=config)
    assert result.baseline == 1.0
    deltas = {name: result.get(name, "params", 2).delta for name in ("0", "1", "2")}
    sqnrs = {name: result.get(name, "params", 2).sqnr_db for name in ("0", "1", "2")}
    assert min(deltas, key=deltas.get) == "1", deltas
    assert min(sqnrs, key=sqnrs.get) == "1", sqnrs
    for name in ("0", "1", "2"):  # more bits, less noise
        assert result.get(name, "params", 8).sqnr_db > result.get(name, "params", 2).sqnr_db
    assert result.cost("1", "params", 2) == -deltas["1"]


def test_the_users_model_is_not_modified() -> None:
    model = _mlp().train()
    before = copy.deepcopy(model.state_dict())
    sensitivity(model, [torch.randn(8, 16)], lambda m: 0.0, bits=(2,))
    assert model.training
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_table_dict_plot_and_progress(tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="qat_lightning.analysis.sensitivity")
    result = sensitivity(_mlp(), [torch.randn(8, 16)], lambda m: 0.5, bits=(2, 8))
    assert isinstance(result, SensitivityResult)
    assert result.layers == ["0", "1", "2"]
    text = str(result)
    assert "2b delta" in text and "8b delta" in text
    assert [line.split()[:2] for line in text.splitlines()[2:7]] == [
        ["0", "params"],
        ["0", "inputs"],
        ["1", "inputs"],
        ["2", "params"],
        ["2", "inputs"],
    ]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["weight_numel"] == {"0": 16 * 32, "2": 32 * 4}
    assert len(data["entries"]) == 10  # 5 (layer, side) pairs x 2 widths
    columns, rows = result.table()
    assert columns[:3] == ["layer", "side", "bits"] and len(rows) == 10
    path = result.plot(tmp_path / "plots" / "sensitivity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    progress = [r.message for r in caplog.records if r.message.startswith("sensitivity ")]
    assert [m.split(":")[0] for m in progress] == [
        "sensitivity 1/3 0",
        "sensitivity 2/3 1",
        "sensitivity 3/3 2",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": (1, 4)}, r"sensitivity\(bits=\(1, 4\)\) is invalid: 1 is not in 2..16"),
        ({"which": ("weights",)}, r"which=\('weights',\)\) is invalid: allowed .*params"),
        ({"metric": lambda m: "high"}, r"metric=...\) returned 'high': allowed a number"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        sensitivity(_mlp(), [torch.randn(4, 16)], **kwargs)


def test_no_batches_raises() -> None:
    with pytest.raises(ValueError, match="yielded no batch"):
        sensitivity(_mlp(), [])
