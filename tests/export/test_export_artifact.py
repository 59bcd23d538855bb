"""save_quantized / load_quantized: safetensors + encodings JSON, bit-identical round trip."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from export_helpers import U8, W8, calibrate, small_cnn
from torch import nn

from qat_lightning.export import ExportError, convert, load_quantized, save_quantized
from qat_lightning.nn import QuantLinear
from qat_lightning.surgery import QuantConfig, quantize_model

FILES = {"model.safetensors", "encodings.json", "report.json"}


class _Net(nn.Module):
    """A small float model for quantize_model: conv-BN-ReLU, residual add, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _qat_net(config: dict) -> nn.Module:
    torch.manual_seed(0)
    model = _Net().eval()
    quantize_model(model, config)
    return calibrate(model, [torch.randn(16, 3, 8, 8) for _ in range(2)])


def test_round_trip_is_bit_identical_from_a_fresh_float_model(tmp_path) -> None:
    config = {"params": {"bits": 4, "granularity": "per_channel"}}
    model = _qat_net(config)
    save_quantized(model, tmp_path / "art", config=config)
    assert {p.name for p in (tmp_path / "art").iterdir()} == FILES
    torch.manual_seed(123)  # different float weights: everything must come from the artifact
    loaded = load_quantized(tmp_path / "art", _Net())
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), convert(model)(x))


def test_round_trip_into_a_qat_model_of_the_same_architecture(tmp_path) -> None:
    model = small_cnn()
    save_quantized(model, tmp_path)
    architecture = small_cnn()  # same structure; its encodings and weights get replaced
    for p in architecture.parameters():
        p.data.normal_()
    loaded = load_quantized(tmp_path, architecture)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), convert(model)(x))


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    model = _qat_net({})
    save_quantized(model, tmp_path, config={})

    def refuse(*args, **kwargs):
        raise AssertionError("load_quantized must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_quantized(tmp_path, _Net())


def test_a_float_model_without_a_saved_config_is_a_clear_error(tmp_path) -> None:
    save_quantized(_qat_net({}), tmp_path)
    with pytest.raises(ExportError, match="config"):
        load_quantized(tmp_path, _Net())


def test_encodings_json_describes_every_tensor(tmp_path) -> None:
    model = small_cnn()
    save_quantized(model, tmp_path)
    saved = json.loads((tmp_path / "encodings.json").read_text())
    acts, params = saved["activation_encodings"], saved["param_encodings"]
    assert set(acts) == {"0.input.0", "0.output", "1.output", "4.output"}
    assert set(params) == {f"{i}.{p}" for i in (0, 1, 4) for p in ("weight", "bias")}
    weight = params["1.weight"]
    keys = {"name", "bits", "symmetric", "signed", "scale", "zero_point", "axis"}
    assert keys | {"representation", "frac_bits"} <= set(weight)
    assert weight["axis"] == 0 and len(weight["scale"]) == 16 == len(weight["zero_point"])
    scale = model[1].param_quantizers["weight"].scale
    assert torch.equal(torch.tensor(weight["scale"]), scale)
    assert acts["0.input.0"]["signed"] is False and acts["0.input.0"]["axis"] is None
    bias = params["0.bias"]
    assert bias["bits"] == 32 and set(bias["zero_point"]) == {0}


def test_report_lists_quantized_and_float_layers(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear.from_float(nn.Linear(8, 16), U8, W8), nn.Linear(16, 4))
    calibrate(model, [torch.randn(8, 8)])
    save_quantized(model, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantized_layers"] == ["0"] and report["float_layers"] == ["1"]
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["0"]["weight_bits"] == 8 and rows["1"]["status"] == "float"


def test_an_unwritable_directory_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="file"):
        save_quantized(small_cnn(), blocker / "artifact")


@pytest.mark.slow
def test_int4_safetensors_is_at_most_14_percent_of_fp32(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    float_model = torchvision.models.resnet18(weights=None).eval()
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, tmp_path / "f.st")
    config = QuantConfig(params={"bits": 4, "granularity": "per_channel"})
    quantize_model(float_model, config)
    calibrate(float_model, [torch.randn(2, 3, 32, 32)])
    save_quantized(float_model, tmp_path / "int4", config=config)
    int4 = (tmp_path / "int4" / "model.safetensors").stat().st_size
    assert int4 <= 0.14 * (tmp_path / "f.st").stat().st_size
