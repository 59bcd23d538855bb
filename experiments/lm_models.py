"""The byte-level GPT-2 of the stdlib LM experiment, its quantization schemes, its
LightningModule, and its metrics.

The model is Hugging Face's ``GPT2LMHeadModel`` from a small config (random init, vocabulary
256 = bytes, untied LM head, no key/value cache) with every ``Conv1D`` projection replaced by
the ``nn.Linear`` it is (weight transposed): qat_lightning's per-group int4 weights, dynamic
activations and the ``MatMulNBits`` export are Linear forms (``QuantHFConv1D`` refuses a
per-group scheme, naming the layer), and torchao's QAT swaps ``nn.Linear`` only. The LM head
is a Linear too; the token and position embeddings stay float (``SKIP``) unless the scheme
(`Scheme`, ``embeddings=True``) quantizes them too, per group (then only ``GELU`` is skipped).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from qat_lightning import QuantModule

# Names in the LMModule: the token and position embeddings, and the add/mul inside GPT-2's
# tanh GELU, which stay float in every scheme (torchao's QAT quantizes only the Linears'
# inputs). SKIP leaves both float; a scheme that quantizes the embeddings skips GELU only.
EMBEDDINGS = ("model.gpt.transformer.wte", "model.gpt.transformer.wpe")
GELU = ("*.mlp.act", "*.mlp.act.*")
SKIP = EMBEDDINGS + GELU

W4_G32 = {"bits": 4, "granularity": "per_group", "group_size": 32}
INT8_DYNAMIC = {"bits": 8, "dynamic": True, "granularity": "per_token"}


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme, as both sides apply it.

    Attributes:
        params: the weight scheme of every Linear (and of both embedding tables where
            ``embeddings``).
        inputs: the input scheme of every Linear; None: weight-only.
        embeddings: the token and position embeddings (``wte``, ``wpe``) are quantized with
            ``params`` too, per group along the embedding dimension; otherwise they stay float.
        onnx: the QAT model is exported to ONNX and measured in onnxruntime.
    """

    params: dict
    inputs: dict | None = None
    embeddings: bool = False
    onnx: bool = False

    @property
    def skip(self) -> list[str]:
        """Our side's ``skip``: GELU's inside always, the embeddings unless quantized."""
        return list(GELU if self.embeddings else SKIP)


SCHEMES = {
    "w4_g32": Scheme(W4_G32, onnx=True),
    "8da4w": Scheme(W4_G32, inputs=INT8_DYNAMIC),
    "w4_g32_emb": Scheme(W4_G32, embeddings=True, onnx=True),
}


def quantized_layers(model: torch.nn.Module, linear=QuantModule, embedding=QuantModule) -> dict:
    """How many Linears and Embeddings of ``model`` are quantized: instances of ``linear``
    (``embedding``) that are also ``nn.Linear`` (``nn.Embedding``), ours by default."""
    modules = list(model.modules())
    return {
        "quantized_linears": sum(
            isinstance(m, linear) and isinstance(m, torch.nn.Linear) for m in modules
        ),
        "quantized_embeddings": sum(
            isinstance(m, embedding) and isinstance(m, torch.nn.Embedding) for m in modules
        ),
    }


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every ``Conv1D`` (``x @ W + b``, ``W`` of shape ``(in, out)``) of ``model`` by
    an equal ``nn.Linear`` (weight ``W.T``), in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                nx, nf = child.weight.shape
                linear = nn.Linear(nx, nf)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


class ByteGPT(nn.Module):
    """GPT-2 on bytes: ``forward(input_ids)`` -> logits ``(batch, sequence, 256)``."""

    def __init__(self, layers: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        self.gpt = transformers.GPT2LMHeadModel(config)
        conv1d_to_linear(self.gpt)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=input_ids, use_cache=False).logits


class LMModule(pl.LightningModule):
    """Next-byte cross-entropy with AdamW and a cosine schedule (linear warmup) over
    ``steps``."""

    def __init__(self, model: nn.Module, lr: float, steps: int, warmup: int = 0) -> None:
        super().__init__()
        self.model, self.lr, self.steps, self.warmup = model, lr, steps, warmup

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            t = (step - self.warmup) / max(1, self.steps - self.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return [opt], [{"scheduler": sched, "interval": "step"}]


class StepProgress(pl.Callback):
    """One stderr line every ``every`` steps: the phase, step, loss and elapsed time."""

    def __init__(self, label: str, steps: int, lines: int = 10) -> None:
        self.label, self.steps, self.every = label, steps, max(1, steps // lines)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            elapsed = time.perf_counter() - self.start
            print(
                f"[{self.label}] step {step}/{self.steps} loss {loss:.3f} {elapsed:.0f}s",
                file=sys.stderr,
                flush=True,
            )


def perplexity(model, loader) -> float:
    """exp(mean next-byte cross-entropy) of ``model`` (a callable ids -> logits) over
    ``loader``, in eval mode without gradients (for a QAT model: its integer simulation)."""
    if isinstance(model, nn.Module):
        model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = torch.as_tensor(model(x)).float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            tokens += y.numel()
    return math.exp(total / tokens)


def fit(
    module: LMModule, loader, steps: int, label: str, callbacks=(), seed: int = 0, root=None
) -> float:
    """Train ``module`` for ``steps`` optimizer steps on ``loader`` (seeded, CPU, no logger
    or checkpoints; what callbacks write goes under ``root``), with a progress line every
    tenth of the run; returns the seconds ``Trainer.fit`` took."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=[*callbacks, StepProgress(label, steps)],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - start
