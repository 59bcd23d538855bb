"""The models ``qat-train`` can build: a small CNN, ResNet-20 for CIFAR, torchvision's resnet18
and mobilenet_v2 (random init), and a small vision transformer.

All take ``(in_channels, image_size, num_classes)`` from the data set and plain float layers;
`QATCallback` quantizes them. Residual adds and attention matmuls are written as plain tensor
ops (``a + b``, ``q @ k``), which model surgery turns into quantized modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages (max pool after the second), global average pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# -- ResNet-20 (He et al. 2016, section 4.2) ----------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; a 1x1 conv-BN projection where the shape changes
    (option B: a projection quantizes and exports like any conv, the zero-padding of option A
    would need its own integer op)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()  # a separate module per use: each holds its own output encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """3 stages of ``blocks`` basic blocks with ``width``, 2x, 4x channels (strides 1, 2, 2);
    ``blocks=3`` is ResNet-20 (0.27 M parameters at width 16)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, previous = [], width
        for i, channels in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(previous, channels, stride))
                previous = channels
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# -- torchvision ------------------------------------------------------------------------------
def torchvision_model(
    name: str, in_channels: int, num_classes: int, small_input: bool, width_mult: float
) -> nn.Module:
    """torchvision's resnet18 / mobilenet_v2 with ``weights=None`` (nothing is downloaded)."""
    from torchvision import models

    if name == "resnet18":
        model = models.resnet18(weights=None, num_classes=num_classes)
        if small_input:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model
    model = models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    stem: nn.Conv2d = model.features[0][0]
    if small_input or in_channels != 3:
        stride = 1 if small_input else 2
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model


# -- a small vision transformer ----------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        # 1/sqrt(d) folded into q's initial weights would change training; scale the logits.
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = self.softmax((q @ k.transpose(-2, -1)) * self.scale)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv), learned positions, pre-norm blocks, mean pooling."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int = 2,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"model.patch_size={patch_size} is invalid: allowed a divisor of the image "
                f"size {image_size}"
            )
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


MODELS = ("cnn", "resnet20", "resnet18", "mobilenet_v2", "transformer")


def build_model(cfg: Any, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The float model the ``model`` config node describes, for this data set's shapes."""
    if cfg.name == "cnn":
        return SmallCNN(in_channels, num_classes, list(cfg.channels))
    if cfg.name == "resnet20":
        return ResNetCifar(in_channels, num_classes, cfg.width, cfg.blocks)
    if cfg.name in ("resnet18", "mobilenet_v2"):
        return torchvision_model(
            cfg.name, in_channels, num_classes, cfg.small_input, cfg.width_mult
        )
    if cfg.name == "transformer":
        return VisionTransformer(
            in_channels,
            image_size,
            num_classes,
            cfg.patch_size,
            cfg.dim,
            cfg.depth,
            cfg.heads,
            cfg.mlp_ratio,
        )
    raise ValueError(f"model.name={cfg.name} is invalid: allowed one of {', '.join(MODELS)}")
