"""The model zoo: every model runs on every data set's shape; ResNet-20 is He et al.'s."""

from __future__ import annotations

import pytest
import torch
from app_helpers import compose_config

from qat_lightning.app.data import DATASETS
from qat_lightning.app.models import BasicBlock, ResNetCifar, build_model


@pytest.mark.parametrize("model", ["cnn", "resnet20", "resnet18", "mobilenet_v2", "transformer"])
@pytest.mark.parametrize("data", ["digits", "cifar10"])
def test_every_model_classifies_every_data_shape(model, data):
    info = DATASETS[data]
    net = build_model(
        compose_config([f"model={model}"]).model, info.in_channels, info.image_size, 10
    )
    x = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    assert net.eval()(x).shape == (2, 10)


def test_resnet20_is_the_cifar_resnet():
    net = ResNetCifar(3, 10)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9  # 6n + 2 = 20 layers with n = 3
    assert [b.conv1.out_channels for b in blocks[::3]] == [16, 32, 64]
    assert [b.conv1.stride[0] for b in blocks[::3]] == [1, 2, 2]
    params = sum(p.numel() for p in net.parameters())
    assert 0.26e6 < params < 0.28e6  # 0.27 M in He et al., Table 6
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
