"""`calibrate`: post-training quantization in one call, on a small CNN and torchvision resnet18.

The models have random weights but a confident head (each class's logit is a linear
discriminant on the class means of the features), so top-1 agreement with the float model is
a measure of how much quantization moved the logits, not of noise between near-equal logits.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qat_lightning
from qat_lightning.export import convert, export_onnx
from qat_lightning.nn import QuantModule
from qat_lightning.quant import Quantizer
from qat_lightning.surgery import QuantConfig, calibrate, compute_encodings, quantize_model

CLASSES, SIZE = 10, 32


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, CLASSES),
    )


def _head(model: nn.Module) -> tuple[nn.Module, str]:
    return (model, "fc") if hasattr(model, "fc") else (model, str(len(model) - 1))


@torch.no_grad()
def _confident(name: str, gen: torch.Generator, prototypes: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = _cnn() if name == "cnn" else torchvision.models.resnet18(num_classes=CLASSES)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    parent, key = _head(model)
    linear = parent._modules[key]
    parent._modules[key] = nn.Identity()
    labels = torch.randint(0, CLASSES, (256,), generator=gen)
    features = model(prototypes[labels] + 0.5 * torch.randn(256, 3, SIZE, SIZE, generator=gen))
    parent._modules[key] = linear
    means = torch.stack([features[labels == c].mean(0) for c in range(CLASSES)])
    center = features.mean(0)
    means = means - center
    gain = 10.0 / means.norm(dim=1).mean()
    linear.weight.copy_(gain * means)
    linear.bias.copy_(-gain * (means * (means / 2 + center)).sum(1))
    return model


def _data(prototypes: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    return prototypes[labels] + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module", params=["cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def ptq(request):
    """A float model, its PTQ int8 twin (calibrated on 4 batches) and held-out data."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(CLASSES, 3, SIZE, SIZE, generator=gen)
    model = _confident(request.param, gen, prototypes)
    reference = copy.deepcopy(model)
    batches = [_data(prototypes, 32, gen) for _ in range(4)]
    report = calibrate(model, batches)
    return model, reference, report, _data(prototypes, 256, gen)


def test_ptq_int8_keeps_the_float_top1(ptq) -> None:
    model, reference, report, x = ptq
    assert report.counts["quantized"] + report.counts["fused"] > 0
    with torch.no_grad():
        agreement = (model.eval()(x).argmax(1) == reference(x).argmax(1)).float().mean()
    assert agreement >= 0.97, float(agreement)


def test_ptq_model_converts_and_eval_equals_convert_bit_for_bit(ptq) -> None:
    model, _, _, x = ptq
    converted = convert(model)
    with torch.no_grad():
        assert torch.equal(converted(x), model.eval()(x))


def test_ptq_changes_no_parameter_or_batchnorm_statistic() -> None:
    """Calibration in train mode too: the float weights and BN buffers stay, the mode stays."""
    torch.manual_seed(0)
    model = _cnn().train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [t.clone() for bn in bns for t in (bn.running_mean, bn.running_var)]
    params = {id(p): p.detach().clone() for p in model.parameters()}
    calibrate(model, [torch.randn(8, 3, SIZE, SIZE) for _ in range(3)])
    assert model.training
    after = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(bn.num_batches_tracked == 0 for bn in bns)
    for p in model.parameters():
        assert torch.equal(p, params[id(p)])
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    assert quantizers and all(q.is_initialized for q in quantizers)
    assert all(bool(q.fake_quant_enabled) and not bool(q.observer_enabled) for q in quantizers)


def test_dataloader_of_pairs_with_input_fn_and_num_batches() -> None:
    """The first ``num_batches`` batches set the encodings, exactly as observing them by hand."""
    torch.manual_seed(0)
    x = torch.randn(40, 3, SIZE, SIZE) * torch.linspace(0.5, 3.0, 40).reshape(-1, 1, 1, 1)
    loader = DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=8)
    model, manual = _cnn().eval(), _cnn().eval()
    manual.load_state_dict(model.state_dict())
    calibrate(model, loader, input_fn=lambda batch: batch[0], num_batches=2)
    quantize_model(manual)
    assert compute_encodings(manual, [x[:8], x[8:16]]) == 2
    scales = [
        (m.scale, n.scale)
        for m, n in zip(model.modules(), manual.modules(), strict=True)
        if isinstance(m, Quantizer)
    ]
    assert scales and all(torch.equal(a, b) for a, b in scales)
    with torch.no_grad():
        all_batches = copy.deepcopy(manual)
        compute_encodings(all_batches, loader, input_fn=lambda batch: batch[0])
        assert not torch.equal(all_batches(x), manual(x))  # the later batches are wider


def test_config_and_changes_reach_the_surgery() -> None:
    model = _cnn().eval()
    report = calibrate(
        model, [torch.randn(4, 3, SIZE, SIZE)], QuantConfig(skip=("8",)), params={"bits": 4}
    )
    assert report.row("8").status == "skipped"
    quantized = [m for m in model.modules() if isinstance(m, QuantModule) and m.param_quantizers]
    assert quantized and all(m.param_quantizers["weight"].scheme.bits == 4 for m in quantized)


def test_calibrate_is_the_public_one_call_ptq() -> None:
    assert qat_lightning.calibrate is calibrate and "calibrate" in qat_lightning.__all__


@pytest.mark.parametrize(
    ("batches", "kwargs", "match"),
    [
        ([], {}, r"calibrate\(batches=...\) is invalid: it yielded no batch"),
        ([torch.randn(2, 3, SIZE, SIZE)], {"num_batches": 0}, r"num_batches=0\) is invalid"),
    ],
)
def test_bad_calls_raise_naming_the_argument(batches, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate(_cnn(), batches, **kwargs)


def test_compute_encodings_refuses_a_float_model() -> None:
    with pytest.raises(ValueError, match="no quantizer; quantize it first"):
        compute_encodings(_cnn(), [torch.randn(2, 3, SIZE, SIZE)])


@pytest.mark.slow
def test_ptq_model_exports_to_onnx_like_a_qat_model(tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    prototypes = torch.randn(CLASSES, 3, SIZE, SIZE, generator=gen)
    model = _confident("cnn", gen, prototypes)
    calibrate(model, [_data(prototypes, 32, gen) for _ in range(2)])
    x = _data(prototypes, 128, gen)
    path = export_onnx(model, x[:2], tmp_path / "ptq.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_top1 = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
    with torch.no_grad():
        integer_top1 = convert(model)(x).argmax(1).numpy()
    assert np.mean(ort_top1 == integer_top1) >= 0.99
