"""No rewrite changes what a model computes: a block whose traced graph would bake in a branch
on the training mode or grad mode keeps its forward; every other rewritten block is checked
against its own forward on its first real inputs, and falls back (one warning, a report entry)
when a flag or global state set after quantize_model takes another branch."""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch
from surgery_cases import tiny_bert
from torch import nn

from qat_lightning.export import convert
from qat_lightning.nn import QuantModule
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import quantize_model
from qat_lightning.surgery.rewrite_check import pending_checks

SETTINGS = SimpleNamespace(residual=True)  # global state a block reads


def _quantization_off(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.enable_fake_quant(False).enable_observer(False)


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    with ExitStack() as stack, torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantModule):
                stack.enter_context(m.compute_encodings())
        model(x)


class TrainingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.training:
            return y + x
        return y * x


class GradBranch(TrainingBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + x if torch.is_grad_enabled() else y * x


class FlagBranch(TrainingBranch):
    def __init__(self) -> None:
        super().__init__()
        self.residual = True  # a config flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + x if self.residual else y * x


class GlobalBranch(TrainingBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + x if SETTINGS.residual else y * x


class Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def _net(block_type: type) -> Net:
    torch.manual_seed(0)
    return Net(block_type())


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))


def test_a_branch_on_self_training_keeps_the_block_forward() -> None:
    model = _net(TrainingBranch).train()  # traced in train mode ...
    with torch.no_grad():
        expected = model.eval()(X)  # ... run in eval mode
    report = quantize_model(model.train())
    assert type(model.block) is TrainingBranch and "block" not in report.rewritten
    assert any(
        "'block'" in w and "stay float" in w and "self.training" in w for w in report.warnings
    )
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(X), expected)


def test_a_branch_on_grad_mode_keeps_the_block_forward() -> None:
    model = _net(GradBranch).eval()
    with torch.no_grad():
        expected = model(X)
    report = quantize_model(model)  # traced with grad enabled
    assert type(model.block) is GradBranch
    assert any("'block'" in w and "torch.is_grad_enabled()" in w for w in report.warnings)
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def _flag_off(model: Net) -> None:
    if hasattr(model.block, "residual"):  # FlagBranch, or its rewrite: a config flag
        model.block.residual = False
    else:  # GlobalBranch: global state
        SETTINGS.residual = False


@pytest.fixture
def settings():
    yield SETTINGS
    SETTINGS.residual = True


@pytest.mark.parametrize("block_type", [FlagBranch, GlobalBranch])
def test_a_flag_set_after_quantize_falls_back_on_the_first_call(block_type, settings) -> None:
    reference = _net(block_type).eval()
    model = copy.deepcopy(reference)
    report = quantize_model(model)
    assert "block" in report.rewritten  # the graph baked in `y + x`
    _flag_off(model)  # after quantize: the original forward now computes y * x
    _flag_off(reference)
    with torch.no_grad():
        expected = reference(X)
    stays_float = r"functional ops in 'block' .*stay float: output 0"
    with pytest.warns(UserWarning, match=stays_float), torch.no_grad():
        model(X)  # the first call checks the graph against the block's own forward
    assert "block" not in report.rewritten
    row = report.row("block.add")
    assert row.status == "float" and row.note.startswith("functional ops stay float: ")
    assert any("'block'" in w and "stay float" in w for w in report.warnings)
    # the head's input quantizer, pruned behind the add, is back: the add is float now
    assert model.head.input_quantizers[0] is not None
    _calibrate(model, X)
    with torch.no_grad():  # what trains is what converts: the integer eval and convert agree
        assert torch.equal(convert(model)(X), model(X))
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_a_checkpoint_saved_after_a_fallback_resumes_exactly() -> None:
    model = _net(FlagBranch).eval()
    quantize_model(model)
    model.block.residual = False
    with pytest.warns(UserWarning, match="stay float"), torch.no_grad():
        model(X)
    _calibrate(model, X)
    with torch.no_grad():
        expected = model(X)
    resumed = _net(FlagBranch).eval()
    quantize_model(resumed)
    resumed.block.residual = False
    with pytest.warns(UserWarning, match="checkpoint was saved after this block fell back"):
        resumed.load_state_dict(model.state_dict())  # strict: the same keys
    assert not pending_checks(resumed)
    with torch.no_grad():
        assert torch.equal(resumed(X), expected)


def test_torchvision_resnet_blocks_pass_the_check_and_keep_state_and_copies() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    report = quantize_model(model)
    assert "layer1.0" in report.rewritten and "add" in model.layer1[0]._modules
    keys = list(model.state_dict())
    copied = copy.deepcopy(model)  # before the first call: the copy checks itself
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stay float")
        with torch.no_grad():
            copied(x)
            model(x)
    assert not pending_checks(model) and not pending_checks(copied)
    assert list(model.state_dict()) == keys  # checkpoints keep their keys
    assert "add" in model.layer1[0]._modules and "layer1.0" in report.rewritten
    for m in (model, copied):
        _quantization_off(m)
        with torch.no_grad():  # up to the rounding of the BN fold (the blocks compared exactly)
            torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_hugging_face_bert_output_blocks_rewrite_and_pass_the_check() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    report = quantize_model(model)
    # BertSelfOutput / BertOutput: LayerNorm(dense(h) + input), rewritten into a QuantAdd
    assert "encoder.layer.0.output" in report.rewritten
    assert "encoder.layer.0.attention.output" in report.rewritten
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stay float")
        with torch.no_grad():
            model(ids)
    assert not pending_checks(model)
    _quantization_off(model)
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, expected)
