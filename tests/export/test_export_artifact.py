"""save_quantized / load_quantized: safetensors + encodings JSON, bit-identical round trip;
published whole with a manifest of hashes; corrupt or mixed artifacts are clear errors."""

from __future__ import annotations

import hashlib
import json
import pickle

import lightning.pytorch as pl
import pytest
import torch
from export_helpers import U8, W8, calibrate, small_cnn
from torch import nn

from qat_lightning.export import ExportError, convert, load_quantized, save_quantized
from qat_lightning.export import artifact as artifact_module
from qat_lightning.nn import QuantLinear
from qat_lightning.surgery import QuantConfig, quantize_model

FILES = {"model.safetensors", "encodings.json", "report.json", "manifest.json"}


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


# -- publishing whole, with a manifest -----------------------------------------------------------
def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def test_re_export_replaces_the_directory_whole_and_leaves_no_temp_files(tmp_path) -> None:
    target = tmp_path / "art"
    save_quantized(_qat_net({}), target, config={})
    second = _qat_net({"params": {"bits": 4}})
    save_quantized(second, target, config={"params": {"bits": 4}})
    assert {p.name for p in target.iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no .tmp / .old leftovers
    assert torch.equal(_outputs(load_quantized(target, _Net())), _outputs(convert(second)))


def test_a_failure_mid_write_keeps_the_old_artifact_and_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "art"
    first = _qat_net({})
    save_quantized(first, target, config={})
    real_save_file = artifact_module.save_file

    def writes_then_fails(state, path, **kwargs):
        real_save_file(state, path, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_module, "save_file", writes_then_fails)
    with pytest.raises(ExportError, match="art"):
        save_quantized(_qat_net({"params": {"bits": 4}}), target, config={})
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert {p.name for p in target.iterdir()} == FILES
    monkeypatch.undo()
    assert torch.equal(_outputs(load_quantized(target, _Net())), _outputs(convert(first)))


def test_a_directory_of_other_files_is_not_replaced(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"notes\.txt"):
        save_quantized(small_cnn(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_mix_of_two_exports_is_refused_naming_the_file(tmp_path) -> None:
    # what a kill between per-file renames used to leave: new weights beside old encodings
    save_quantized(_qat_net({}), tmp_path / "old", config={})
    save_quantized(_qat_net({"params": {"bits": 4}}), tmp_path / "new", config={})
    (tmp_path / "old" / "model.safetensors").write_bytes(
        (tmp_path / "new" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ExportError, match=r"model\.safetensors.*sha256"):
        load_quantized(tmp_path / "old", _Net())


def _rehash(directory) -> None:
    """Make the manifest agree with the files again (a corrupt file with a matching hash)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-mismatch", "hash-matches"])
@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        ("encodings.json", lambda p: p.write_text(p.read_text()[:100])),
        ("report.json", lambda p: p.write_text("{not json")),
        ("model.safetensors", lambda p: p.write_bytes(b"garbage" * 10)),
    ],
    ids=["truncated-encodings", "garbage-report", "garbage-safetensors"],
)
def test_a_corrupt_file_is_an_export_error_naming_it(tmp_path, name, corrupt, rehash) -> None:
    save_quantized(_qat_net({}), tmp_path, config={})
    corrupt(tmp_path / name)
    if rehash:
        _rehash(tmp_path)
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        load_quantized(tmp_path, _Net())


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_missing_file_is_an_export_error_naming_it(tmp_path, name) -> None:
    save_quantized(_qat_net({}), tmp_path, config={})
    (tmp_path / name).unlink()
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        load_quantized(tmp_path, _Net())


def test_a_truncated_manifest_is_an_export_error_naming_it(tmp_path) -> None:
    save_quantized(_qat_net({}), tmp_path, config={})
    (tmp_path / "manifest.json").write_text('{"format": "qat_l')
    with pytest.raises(ExportError, match=r"manifest\.json"):
        load_quantized(tmp_path, _Net())


# -- a LightningModule as the architecture ---------------------------------------------------------
class _Classifier(pl.LightningModule):
    """A LightningModule wrapping a model, as a user writes one."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Net()

    def forward(self, x):
        return self.model(x)


def test_an_artifact_of_the_inner_model_loads_into_the_lightning_module(tmp_path) -> None:
    config = {"params": {"bits": 4, "granularity": "per_channel"}}
    trained = _qat_net(config)
    save_quantized(trained, tmp_path, config=config)  # QATCallback saves the inner model
    torch.manual_seed(7)
    module = _Classifier()
    loaded = load_quantized(tmp_path, module)
    assert loaded is module and not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(convert(trained)))


def test_an_artifact_of_the_lightning_module_loads_into_the_inner_model(tmp_path) -> None:
    module = _Classifier().eval()
    quantize_model(module.model, {})
    calibrate(module, [torch.randn(16, 3, 8, 8) for _ in range(2)])
    save_quantized(module, tmp_path, config={})
    loaded = load_quantized(tmp_path, _Net())
    assert torch.equal(_outputs(loaded), _outputs(convert(module)))
