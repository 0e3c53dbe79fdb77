"""WarmupSchedule: linear warmup, then linear or cosine decay to a floor, set from the global step."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class WarmupSchedule(Callback):
    """Scale each optimizer's learning rate by a warmup-then-decay factor before every optimizer step.

    The factor of optimizer step ``s`` (0-based, ``T`` total steps, ``W`` warmup steps, ``f`` = ``min_ratio``):

    * ``s < W``: ``(s + 1) / W`` (the first step already moves),
    * then with ``p = (s - W) / max(1, T - W)``: linear ``f + (1 - f)(1 - p)``, cosine
      ``f + (1 - f)(1 + cos(pi p)) / 2``, or constant ``1``.

    ``T`` is ``trainer.estimated_stepping_batches`` (optimizer steps: counts ``accumulate_grad_batches``,
    ``max_steps`` and ``max_epochs``). The rate is recomputed from ``trainer.global_step`` each step, so a resumed
    run continues on the same curve with nothing else to restore. The peak rate is the optimizer's own ``lr``
    (kept in each param group's ``initial_lr``, as torch schedulers do). Logs ``lr-<Optimizer>`` every step.

    Args:
        warmup_steps: warmup length in optimizer steps; mutually exclusive with ``warmup_fraction``.
        warmup_fraction: warmup length as a fraction of the total optimizer steps (default 0.05 when neither is given).
        decay: ``cosine``, ``linear`` or ``none`` after warmup.
        min_ratio: the floor, as a fraction of the peak rate, reached at the last step.
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        decay: Literal["cosine", "linear", "none"] = "cosine",
        min_ratio: float = 0.1,
    ) -> None:
        if warmup_steps is not None and warmup_fraction is not None:
            raise ValueError("Give warmup_steps or warmup_fraction, not both.")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if warmup_fraction is not None and not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}.")
        if decay not in ("cosine", "linear", "none"):
            raise ValueError(f"decay must be cosine, linear or none, got {decay!r}.")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}.")
        self.warmup_steps = warmup_steps
        self.warmup_fraction = 0.05 if warmup_steps is None and warmup_fraction is None else warmup_fraction
        self.decay = decay
        self.min_ratio = min_ratio
        self.total_steps: int | None = None

    def warmup_length(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * total_steps)

    def factor(self, step: int, total_steps: int) -> float:
        """The multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total_steps``."""
        warmup = self.warmup_length(total_steps)
        if step < warmup:
            return (step + 1) / warmup
        if self.decay == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_ratio + (1 - self.min_ratio) * shape

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs bounds the run
        if not math.isfinite(total) or total <= 0:
            raise ValueError("WarmupSchedule needs a finite run: set trainer.max_steps or trainer.max_epochs.")
        self.total_steps = int(total)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])  # on resume, restored with the optimizer state

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        factor = self.factor(trainer.global_step, self.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        # a CPU tensor: logging a Python float copies it to the GPU, which waits for all queued GPU work
        lr = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)
        pl_module.log(f"lr-{type(optimizer).__name__}", lr, on_step=True, on_epoch=False, batch_size=1)
