"""quantize_model on architectures nobody here wrote: torchvision resnet18 and mobilenet_v2, and
a small transformer language model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from surgery_cases import (
    BN_TYPES,
    TinyLM,
    calibrate,
    float_layers,
    randomize_bn,
    set_fake_quant,
    sqnr_db,
)
from torch import nn

from qat_lightning.nn import QuantAdd, QuantMatMul, QuantModule
from qat_lightning.surgery import quantize_model


@pytest.fixture(scope="module")
def resnet():
    """A quantized resnet18, its float twin and its report (built once: surgery is in place)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    report = quantize_model(model)
    return model, reference, report


def test_resnet18_every_conv_linear_bn_is_fused_or_quantized(resnet):
    model, reference, report = resnet
    layers = float_layers(reference)
    assert len(layers) == 20 + 20 + 1  # convs, BNs, fc
    for name, before in layers.items():
        row = report.row(name)
        assert row.before == before.__name__
        assert row.status in ("fused", "quantized"), row
        after = model.get_submodule(name)
        if issubclass(before, BN_TYPES):
            assert isinstance(after, nn.Identity)  # the BN lives on inside the fused conv
            assert row.status == "fused"
        else:
            assert isinstance(after, QuantModule) and isinstance(after, before)
    fused_convs = [m for m in model.modules() if hasattr(m, "bn") and isinstance(m, QuantModule)]
    assert len(fused_convs) == 20
    counts = report.counts
    assert counts["fused"] == sum(r.status == "fused" for r in report.rows)
    assert counts["fused"] == 20 + 20 + 1  # conv + BN rows, and the stem's ReLU
    assert counts["float"] == counts["skipped"] == 0
    assert counts["quantized"] == len(report.rows) - counts["fused"]
    assert report.warnings == [] and report.traced


def test_resnet18_residual_adds_become_quant_add(resnet):
    model, _, report = resnet
    adds = [n for n, m in model.named_modules() if isinstance(m, QuantAdd)]
    assert len(adds) == 8
    assert sorted(adds) == sorted(r.name for r in report.rows if r.after == "QuantAdd")
    assert len(report.rewritten) == 8  # each BasicBlock became a GraphModule
    assert isinstance(model, torchvision.models.ResNet)  # the root keeps its class


def test_resnet18_float_function_unchanged_with_fake_quant_off(resnet):
    model, reference, _ = resnet
    x = torch.randn(2, 3, 64, 64)
    set_fake_quant(model, False)
    try:
        with torch.no_grad():
            assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=1e-4)
    finally:
        set_fake_quant(model, True)


def test_resnet18_only_the_stem_quantizes_its_input(resnet):
    model, _, report = resnet
    kept = [
        n for n, m in model.named_modules()
        if isinstance(m, QuantModule) and any(q is not None for q in m.input_quantizers)
    ]  # fmt: skip
    assert kept == ["conv1"] == report.kept_input_quantizers


def test_each_pruned_input_reads_its_producers_quantizer(resnet):
    # behind the max pool too: its own input quantizer is pruned, so layer1.0.conv1 reads
    # conv1's output quantizer (the bias is rounded at that s_in * s_w)
    model, _, _ = resnet
    owned = {id(q) for m in model.modules() if isinstance(m, QuantModule) for q in m.quantizers()}
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        for i, quantizer in enumerate(module.input_quantizers):
            if quantizer is None:
                assert id(module.input_encoding(i)) in owned, (name, i)
    first = model.get_submodule("layer1.0.conv1")
    assert first.input_encoding(0) is model.conv1.output_quantizers[0]


@pytest.mark.slow
def test_resnet18_w8a8_sqnr_after_calibration():
    # Default BN statistics (mean 0, var 1): BN is then an affine identity and the random
    # ResNet a well-conditioned residual net. With batch statistics of random data instead, a
    # random-init BN network is chaotic (Yang et al. 2019, "A Mean Field Theory of Batch
    # Normalization": perturbations grow exponentially with depth), and the noise of 20
    # quantized layers compounds to ~20-24 dB whatever the quantizer: a property of random
    # weights, not of quantization (trained networks are not chaotic).
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    batches = [torch.randn(8, 3, 64, 64) for _ in range(4)]
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    quantize_model(
        model,
        inputs={"bits": 8, "symmetric": False, "signed": False},
        params={"bits": 8, "symmetric": True, "granularity": "per_channel"},
    )
    calibrate(model, batches)
    with torch.no_grad():
        assert sqnr_db(reference, model(x)) >= 30.0


@pytest.mark.slow
def test_mobilenet_v2_fused_adds_and_float_function():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    residuals = sum(
        getattr(m, "use_res_connect", False) for m in reference.modules()
    )  # InvertedResidual blocks with ``x + self.conv(x)``
    report = quantize_model(model)
    for name in float_layers(reference):
        assert report.row(name).status in ("fused", "quantized")
    bns = [n for n, t in float_layers(reference).items() if issubclass(t, BN_TYPES)]
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in bns)
    assert sum(isinstance(m, QuantAdd) for m in model.modules()) == residuals == 10
    assert report.row("features.0.2").after == "QuantReLU6"
    assert report.counts["float"] == 0
    # the root's forward pools with a function: the classifier quantizes its own input
    assert report.kept_input_quantizers == ["features.0.0", "classifier.1"]
    x = torch.randn(2, 3, 64, 64)
    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=1e-4)
    set_fake_quant(model, True)
    calibrate(model, [torch.randn(4, 3, 64, 64) for _ in range(2)])
    with torch.no_grad():
        assert sqnr_db(reference(x), model(x)) >= 30.0  # measured 35.8 dB


def test_transformer_block():
    torch.manual_seed(0)
    model = TinyLM().eval()
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 64, (4, 12))
    report = quantize_model(model)
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1
    assert all(report.row(n).status == "quantized" for n in [*linears, "embed"])
    assert all(report.row(f"blocks.{i}.mlp.1").after == "QuantGELU" for i in range(2))
    norms = [r for r in report.rows if r.before == "LayerNorm"]
    assert len(norms) == 5 and all(r.status == "float" and "LayerNorm" in r.note for r in norms)
    # two residual adds and two attention matmuls per block
    assert sum(isinstance(m, QuantAdd) for m in model.modules()) == 4
    assert sum(isinstance(m, QuantMatMul) for m in model.modules()) == 4
    # the LayerNorms and the mean are float producers; everything else is pruned
    assert sorted(report.kept_input_quantizers) == sorted(
        ["blocks.0.qkv", "blocks.0.mlp.0", "blocks.0.matmul_1", "blocks.1.qkv",
         "blocks.1.mlp.0", "blocks.1.matmul_1", "head"]
    )  # fmt: skip
    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference(tokens), atol=1e-6)
    set_fake_quant(model, True)
    calibrate(model, [torch.randint(0, 64, (8, 12)) for _ in range(2)])
    with torch.no_grad():
        assert sqnr_db(reference(tokens), model(tokens)) >= 28.0  # measured 31.4 dB


def test_parameters_are_the_same_objects_and_state_dict_keys_survive():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    report = quantize_model(model)
    assert {id(p) for p in model.parameters()} == params
    after = set(model.state_dict())
    for key in keys:  # a fused BN's keys moved under its conv (report.renamed says where)
        prefix = next((p for p in report.renamed if key.startswith(p + ".")), None)
        moved = key if prefix is None else report.renamed[prefix] + key[len(prefix) :]
        assert moved in after, key
    assert report.renamed["layer1.0.bn1"] == "layer1.0.conv1.bn"


def test_learnable_scales_are_the_only_new_parameters():
    model = TinyLM()
    params = {id(p) for p in model.parameters()}
    quantize_model(model, inputs={"learnable": True}, params={"learnable": True})
    new = {n for n, p in model.named_parameters() if id(p) not in params}
    assert new and all(n.endswith((".scale", ".zero_point")) for n in new)
    assert all("_quantizers." in n for n in new)


def test_state_dict_round_trip_and_deepcopy():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    quantize_model(model)
    calibrate(model, [torch.randn(2, 3, 32, 32)])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    twin = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    quantize_model(twin)
    twin.load_state_dict(model.state_dict())  # strict: the same keys on both sides
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
        assert torch.equal(clone(x), expected)


def test_train_mode_is_kept_and_fused_bn_trains():
    model = torchvision.models.resnet18(weights=None, num_classes=10).train()
    quantize_model(model)
    assert all(m.training for m in model.modules())
    bn = model.layer1[0].conv1.bn
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)  # live BN statistics in QAT


def test_quantizing_twice_is_refused():
    model = TinyLM()
    quantize_model(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)


def test_report_str_and_to_dict(resnet):
    _, _, report = resnet
    text = str(report)
    lines = text.splitlines()
    # the resolved schemes head the table: the defaults, every field that matters
    assert lines[0] == "inputs: 8-bit affine unsigned per_tensor moving_minmax"
    assert lines[1] == "params: 8-bit symmetric signed per_channel minmax"
    assert lines[2].split()[:4] == ["name", "before", "after", "status"]
    assert "layer1.0.add" in text and "QuantConvBnReLU2d" in text
    assert f"{len(report.rows)} layers: " in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"] == report.counts
    row = next(r for r in data["rows"] if r["name"] == "fc")
    assert row["params"]["granularity"] == "per_channel" and row["inputs"]["signed"] is False
    assert data["inputs"]["observer"] == "moving_minmax" and data["params"]["symmetric"]


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("googlenet", {"aux_logits": False, "init_weights": False}),  # F.relu in forward, cat
        ("shufflenet_v2_x0_5", {}),  # chunk, cat, channel shuffle (view / transpose)
        ("efficientnet_b0", {}),  # squeeze-excitation ``scale * x``, SiLU, stochastic depth
    ],
)
def test_more_architectures_fuse_every_bn_and_keep_their_float_function(arch, kwargs):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, **kwargs).eval()
    randomize_bn(model)
    reference = copy.deepcopy(model)
    report = quantize_model(model)
    assert report.warnings == []
    for name, before in float_layers(reference).items():
        assert report.row(name).status in ("fused", "quantized"), name
        if issubclass(before, BN_TYPES):
            assert isinstance(model.get_submodule(name), nn.Identity)
    x = torch.randn(1, 3, 64, 64)
    set_fake_quant(model, False)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=1e-4)
