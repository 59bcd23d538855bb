"""Shared pieces of the surgery tests: calibration / comparison helpers, and small models (a
transformer language model, a model that does not trace with torch.fx, conv nets with
functional ReLU, residual adds and a cat)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.quant import Quantizer

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MAC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for q in quantizers(model):
        q.enable_fake_quant(enabled).enable_observer(False)


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with contextlib.ExitStack() as stack:
        for q in quantizers(model):
            stack.enter_context(q.compute_encodings())
        for x in batches:
            model(x)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so folding really changes weights."""
    gen = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, BN_TYPES):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            bn.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def float_layers(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, MAC_TYPES + BN_TYPES)}


class Block(nn.Module):
    """Pre-LN transformer block; attention written out with Linear layers and matmuls."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q = q.view(b, t, self.heads, -1).transpose(1, 2)
        k = k.view(b, t, self.heads, -1).transpose(1, 2)
        v = v.view(b, t, self.heads, -1).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.drop(self.proj(y))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(tokens))
        return self.head(self.ln_f(x).mean(dim=1))


class Residual(nn.Module):
    """conv-bn-F.relu, conv-bn, a residual ``+`` and ``torch.relu``: functional ops to rewrite."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class Branchy(nn.Module):
    """Data-dependent control flow in forward: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Residual(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        if x.mean() > 0:  # data-dependent: a Proxy has no truth value
            x = self.block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallNet(nn.Module):
    """A traceable conv net with a residual block and a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Residual(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.merge = Merge()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = self.merge(x, self.side(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Merge(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1)


def tiny_bert() -> nn.Module:
    """Hugging Face's ``BertModel`` from a tiny config, random init (nothing is downloaded),
    in eval mode; skips the test where transformers is not installed."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval()
