"""TokenThroughput: real (non-padding) training tokens per second, and peak GPU memory on CUDA."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def real_tokens(batch: dict, pad_id: int | None, eos_id: int | None = None) -> int:
    """Tokens that are not padding: the 2-D attention mask's sum, else ``input_ids != pad_id`` (when padding has its
    own id), else every position."""
    return int(real_token_count(batch, pad_id, eos_id))


def real_token_count(batch: dict, pad_id: int | None, eos_id: int | None = None) -> torch.Tensor | int:
    """:func:`real_tokens` as a tensor on the batch's device, so counting waits for nothing on a GPU."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.sum()
    ids = batch["input_ids"]
    if pad_id is not None and pad_id != eos_id:
        return (ids != pad_id).sum()
    return ids.numel()


class TokenThroughput(Callback):
    """Log ``throughput/tokens_per_sec`` (non-padding tokens over the wall time since the previous log) every
    ``log_every_n_steps`` batches, and ``throughput/max_memory_gb`` (``torch.cuda.max_memory_allocated``) on CUDA.
    Lightning's ThroughputMonitor wants Python functions for batch sizes, which a YAML config cannot give."""

    def __init__(self) -> None:
        self.tokens = 0
        self.started: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        # summed on the device: read (one sync) only when logged
        self.tokens += real_token_count(batch, getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) != 0:
            return
        now = time.perf_counter()
        metrics = {"throughput/tokens_per_sec": float(self.tokens) / max(now - self.started, 1e-9)}
        if pl_module.device.type == "cuda":
            metrics["throughput/max_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.tokens, self.started = 0, now

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens, self.started = 0, None  # validation time is not training time
