"""OnnxModel: an exported file run from Python, tensors in and out, mistakes named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import U8, W8, calibrate, ort_run, small_cnn
from torch import nn

from qat_lightning.export import ExportError, OnnxModel, export_onnx
from qat_lightning.nn import QuantLinear


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "m.onnx"
    return export_onnx(
        small_cnn(), torch.randn(2, 3, 16, 16), path, metadata={"metrics": {"val_acc": 0.5}}
    )


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = QuantLinear.from_float(nn.Linear(4, 3), U8, W8)
        self.b = QuantLinear.from_float(nn.Linear(6, 2), U8, W8)

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        return {"left_out": self.a(left), "right_out": self.b(right)}


@pytest.fixture(scope="module")
def two_inputs_path(tmp_path_factory):
    torch.manual_seed(0)
    model = calibrate(_TwoInputs(), [(torch.randn(16, 4), torch.randn(16, 6))])
    path = tmp_path_factory.mktemp("two") / "m.onnx"
    return export_onnx(model, (torch.randn(2, 4), torch.randn(2, 6)), path)


def test_one_call_gives_the_tensor_onnxruntime_computes(cnn_path) -> None:
    model = OnnxModel(cnn_path)
    x = torch.randn(5, 3, 16, 16)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    np.testing.assert_array_equal(logits.numpy(), ort_run(cnn_path, x))
    np.testing.assert_array_equal(model(input=x).numpy(), logits.numpy())  # by name too
    assert model.input_names == ["input"] and model.output_names == ["logits"]


def test_metadata_is_read_back_decoded(cnn_path) -> None:
    import qat_lightning

    metadata = OnnxModel(cnn_path).metadata
    assert metadata["metrics"] == {"val_acc": 0.5}
    assert metadata["qat_lightning.version"] == qat_lightning.__version__
    assert metadata["qat_lightning.schemes"]["params"][0]["scheme"]["bits"] == 8


def test_several_inputs_by_position_or_name_and_outputs_by_name(two_inputs_path) -> None:
    model = OnnxModel(two_inputs_path)
    left, right = torch.randn(3, 4), torch.randn(3, 6)
    by_position = model(left, right)
    by_name = model(right=right, left=left)
    assert list(by_position) == ["left_out", "right_out"]
    assert by_position["left_out"].shape == (3, 3) and by_position["right_out"].shape == (3, 2)
    for name in by_position:
        assert torch.equal(by_position[name], by_name[name])
    assert torch.equal(model(left, right=right)["right_out"], by_name["right_out"])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m(torch.randn(2, 3, 16)), ValueError, r"'input' has shape \(2, 3, 16\)"),
        (lambda m: m(torch.randn(2, 4, 16, 16)), ValueError, r"allowed \(batch, 3, 16, 16\)"),
        (lambda m: m(torch.randn(2, 3, 16, 16).double()), TypeError, "'input'.*float64"),
        (lambda m: m(images=torch.randn(2, 3, 16, 16)), TypeError, "unknown input 'images'"),
        (lambda m: m(), TypeError, "missing input 'input'"),
        (lambda m: m(np.zeros((2, 3, 16, 16), np.float32)), TypeError, "'input' is a ndarray"),
        (lambda m: m(torch.randn(1, 3, 16, 16), torch.randn(1)), TypeError, "at most 1"),
    ],
    ids=["rank", "fixed dim", "dtype", "unknown name", "missing", "not a tensor", "too many"],
)
def test_a_wrong_input_is_a_clear_error_naming_it(cnn_path, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(OnnxModel(cnn_path))


def test_a_missing_input_of_several_is_named(two_inputs_path) -> None:
    with pytest.raises(TypeError, match="missing input 'right'"):
        OnnxModel(two_inputs_path)(torch.randn(2, 4))


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ExportError, match="no such file"):
        OnnxModel(tmp_path / "nothing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ExportError, match=r"broken\.onnx.*cannot load"):
        OnnxModel(broken)
