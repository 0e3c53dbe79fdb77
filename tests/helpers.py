"""Small pieces the tests share: a QLoRAModule on the tiny model, a packed batch of emoji chats, a few AdamW steps."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from lit_llama_lab.data.masking import assistant_labels
from lit_llama_lab.data.packing import collate_packed, pack_best_fit
from lit_llama_lab.speed.attention import attention_inputs
from lit_llama_lab.speed.loss import label_loss
from lit_llama_lab.tasks.emoji.rows import build_emoji_rows, emoji_messages
from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs
from lit_llama_lab.train.module import QLoRAModule

ROOT = Path(__file__).resolve().parents[1]
PRECISION_FIELDS = {f.name for f in fields(PrecisionArgs)}
SPEED_FIELDS = {f.name for f in fields(SpeedArgs)}


def module_args(**settings) -> dict:
    """QLoRAModule keyword arguments from flat settings: PrecisionArgs and SpeedArgs fields go into their groups."""
    precision = {k: settings.pop(k) for k in list(settings) if k in PRECISION_FIELDS}
    speed = {k: settings.pop(k) for k in list(settings) if k in SPEED_FIELDS}
    return {**settings, "precision": PrecisionArgs(**precision), "speed": SpeedArgs(**speed)}


def make_module(name="tiny-random", **settings) -> QLoRAModule:
    """A configured QLoRAModule (rsLoRA r8) on ``name``; ``settings`` as :func:`module_args` takes them."""
    module = QLoRAModule(name_or_path=name, lora=LoraArgs(r=8, alpha=16, use_rslora=True), **module_args(**settings))
    module.configure_model()
    return module


def packed_emoji(tokenizer, n=8) -> dict:
    """The first ``n`` emoji chats packed into rows of at most 512 tokens: a neutral batch, as the data module makes."""
    examples = []
    for row in build_emoji_rows()[:n]:
        chat = assistant_labels(tokenizer, emoji_messages(row))
        examples.append({"input_ids": chat.input_ids, "labels": chat.labels})
    bins = pack_best_fit([len(e["input_ids"]) for e in examples], 512)
    return collate_packed([[examples[i] for i in b] for b in bins], tokenizer.pad_token_id)


def emoji_batch(tokenizer, n=8) -> dict:
    """:func:`packed_emoji` with sdpa's block mask (``speed.attention``), ready for a model loaded with sdpa."""
    return attention_inputs(packed_emoji(tokenizer, n), "sdpa")


def train(module, batch, steps: int) -> list[float]:
    """``steps`` AdamW steps of the label loss on one batch; the losses."""
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss = label_loss(module.model, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def on_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
