"""The six transformers of issue 13's acceptance list, from small configs with random init
(nothing downloaded), each with its example inputs and a training loss.

- ``vit``: torchvision ``VisionTransformer`` (images, top-1);
- ``swin``: torchvision ``SwinTransformer``, ``swin_t``'s layout at a small size (images, top-1);
- ``transformer_encoder``: ``nn.TransformerEncoder`` with a mean-pool classifier head (top-1);
- ``lightning_transformer``: Lightning's ``LightningTransformer`` demo, ``forward(inputs,
  target)`` over token ids (per-token argmax);
- ``bert``: Hugging Face ``BertForSequenceClassification``, ``input_ids`` / ``attention_mask``
  / ``token_type_ids`` (top-1);
- ``gpt2``: Hugging Face ``GPT2LMHeadModel`` without the key/value cache (per-token argmax).

``size="tiny"`` gives the configs of the tests (seconds each); ``size="small"`` the table's and
benchmark's (``vit`` small: 4 layers of width 192 on 32 px images with 4 px patches, 65
tokens; ``bert`` small: BERT-tiny, 2 layers of width 128, sequence 64). The configs of
``tiny`` are those of the acceptance tests in ``tests/export`` and ``tests/callback``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Case:
    """One model: how to build it and feed it.

    Attributes:
        name: short name (the table's row).
        build: a fresh float model (random init; call ``torch.manual_seed`` first).
        batch: ``(batch_size, seed) -> input`` of one forward call: a tensor, a tuple
            (positional) or a dict (keyword).
        per_token: agreement is per-token argmax (language models), not top-1 per sample.
        classes: logits per sample (per token when ``per_token``).
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Any]
    per_token: bool
    classes: int

    def logits(self, output: Any) -> torch.Tensor:
        """The logits of one forward's output, flattened to ``(samples or tokens, classes)``."""
        logits = output.logits if hasattr(output, "logits") else output
        return logits.reshape(-1, logits.shape[-1])

    def loss(self, output: Any, seed: int) -> torch.Tensor:
        """Cross entropy of the output against fixed random targets (a QAT step's loss)."""
        logits = self.logits(output)
        generator = torch.Generator().manual_seed(seed)
        target = torch.randint(0, self.classes, (logits.shape[0],), generator=generator)
        return F.cross_entropy(logits, target.to(logits.device))


def call(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _images(size: int) -> Callable[[int, int], torch.Tensor]:
    def batch(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return batch


def _tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def vit(size: str) -> Case:
    small = size == "small"

    def build() -> nn.Module:
        model = torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=4 if small else 8,
            num_layers=4 if small else 2,
            num_heads=3 if small else 4,
            hidden_dim=192 if small else 32,
            mlp_dim=768 if small else 64,
            num_classes=10,
        )
        nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises it
        return model

    return Case("vit", build, _images(32), per_token=False, classes=10)


def swin(size: str) -> Case:
    small = size == "small"

    def build() -> nn.Module:
        from torchvision.models.swin_transformer import SwinTransformer

        return SwinTransformer(  # swin_t's layout (patch 4, window 7 -> 4 at 32 px), narrower
            patch_size=[4, 4],
            embed_dim=48 if small else 16,
            depths=[2, 2] if small else [1, 1],
            num_heads=[3, 6] if small else [2, 2],
            window_size=[4, 4],
            num_classes=10,
        )

    return Case("swin", build, _images(32), per_token=False, classes=10)


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` over a sequence of feature vectors, mean-pooled, a Linear head."""

    def __init__(self, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def transformer_encoder(size: str) -> Case:
    dim, length = (128, 32) if size == "small" else (32, 6)

    def batch(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, length, dim, generator=torch.Generator().manual_seed(seed))

    return Case(
        "transformer_encoder", lambda: EncoderClassifier(dim), batch, per_token=False, classes=10
    )


def lightning_transformer(size: str) -> Case:
    vocab, length = 50, 12
    dim, layers = (128, 2) if size == "small" else (32, 1)

    def build() -> nn.Module:
        from lightning.pytorch.demos import LightningTransformer, Transformer

        model = LightningTransformer(vocab_size=vocab)
        model.model = Transformer(vocab_size=vocab, ninp=dim, nhead=2, nhid=2 * dim, nlayers=layers)
        return model

    def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = _tokens(n, length + 1, vocab, seed)
        return tokens[:, :-1], tokens[:, 1:]  # (inputs, target) as the demo's WikiText2 gives

    return Case("lightning_transformer", build, batch, per_token=True, classes=vocab)


def bert(size: str) -> Case:
    small = size == "small"
    vocab, length = (30522, 64) if small else (60, 12)

    def build() -> nn.Module:
        import transformers

        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=128 if small else 32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512 if small else 64,
            max_position_embeddings=512 if small else 64,
            num_labels=3,
        )
        return transformers.BertForSequenceClassification(config)

    def batch(n: int, seed: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(n, length, dtype=torch.int64)
        mask[0, length // 2 :] = 0  # one padded sequence
        return {
            "input_ids": _tokens(n, length, vocab, seed),
            "attention_mask": mask,
            "token_type_ids": torch.zeros(n, length, dtype=torch.int64),
        }

    return Case("bert", build, batch, per_token=False, classes=3)


def gpt2(size: str) -> Case:
    small = size == "small"
    vocab, length = (512, 64) if small else (128, 32)

    def build() -> nn.Module:
        import transformers

        config = transformers.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=128 if small else 32,
            vocab_size=vocab,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,  # the exporter cannot return the key/value cache
        )
        return transformers.GPT2LMHeadModel(config)

    return Case("gpt2", build, lambda n, seed: _tokens(n, length, vocab, seed), True, vocab)


BUILDERS: dict[str, Callable[[str], Case]] = {
    "vit": vit,
    "swin": swin,
    "transformer_encoder": transformer_encoder,
    "lightning_transformer": lightning_transformer,
    "bert": bert,
    "gpt2": gpt2,
}


def case(name: str, size: str = "small") -> Case:
    """The case called ``name`` (one of `BUILDERS`) at ``size`` (``"tiny"`` or ``"small"``)."""
    if name not in BUILDERS:
        raise ValueError(f"case(name={name!r}) is unknown: allowed {sorted(BUILDERS)}")
    if size not in SIZES:
        raise ValueError(f"case(size={size!r}) is unknown: allowed {list(SIZES)}")
    return BUILDERS[name](size)
