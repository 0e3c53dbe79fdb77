"""DivergenceGuard: stop a run whose training loss turned NaN/inf, collapsed to ~0 or exploded."""

from __future__ import annotations

import logging
import math
from collections import deque

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

log = logging.getLogger(__name__)


class DivergenceGuard(Callback):
    """Watch the training loss every batch; on trouble set ``trainer.should_stop`` and say why.

    Trips when the loss is NaN or inf (at once), below ``zero_threshold`` for ``window`` batches in a row (a loss of
    exactly 0 for many steps means the labels are gone or the model found a shortcut: nothing is learnt), or when the
    mean of the last ``window`` losses exceeds ``explode_factor`` x the lowest such mean seen so far. The message
    names the last good checkpoint; once tripped, AdapterCheckpoint writes nothing more, so that file stays good.

    Args:
        window: batches the zero and explosion checks look at.
        zero_threshold: a loss below this counts as collapsed.
        explode_factor: how far above its best windowed mean the windowed mean may rise.
        check_every_n_steps: read the losses every this many batches (1: at once). Reading a GPU loss waits for the
            GPU; on a fast GPU path reading every 10th batch keeps the host ahead. A trip then stops training up to
            this many batches late (checkpoints written meanwhile are named as the last good one only if written
            before the bad batch).
    """

    def __init__(self, window: int = 20, zero_threshold: float = 1e-4, explode_factor: float = 4.0,
                 check_every_n_steps: int = 1) -> None:
        if window < 1 or zero_threshold < 0 or explode_factor <= 1 or check_every_n_steps < 1:
            raise ValueError("DivergenceGuard needs window >= 1, zero_threshold >= 0, explode_factor > 1 and "
                             "check_every_n_steps >= 1.")
        self.window, self.zero_threshold, self.explode_factor = window, zero_threshold, explode_factor
        self.check_every_n_steps = check_every_n_steps
        self.pending: list[torch.Tensor] = []  # losses not read yet
        self.recent: deque[float] = deque(maxlen=window)
        self.best_mean = math.inf
        self.diverged: str | None = None  # the reason, once tripped
        self.message: str | None = None  # what was reported

    def problem(self, loss: float) -> str | None:
        """Add ``loss`` to the window; return what is wrong, or None."""
        if not math.isfinite(loss):
            return f"the training loss is {loss}"
        self.recent.append(loss)
        if len(self.recent) < self.window:
            return None
        if max(self.recent) < self.zero_threshold:
            return f"the training loss stayed below {self.zero_threshold:g} for {self.window} batches (it collapsed to ~0)"
        mean = sum(self.recent) / self.window
        if mean > self.explode_factor * self.best_mean:
            return (f"the training loss exploded: its mean over {self.window} batches is {mean:.4g}, "
                    f"over {self.explode_factor:g}x its best {self.best_mean:.4g}")
        self.best_mean = min(self.best_mean, mean)
        return None

    @staticmethod
    def last_good_checkpoint(trainer: L.Trainer) -> str | None:
        """The newest checkpoint written before the guard tripped (``last``, else the best one)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                path = callback.last_model_path or callback.best_model_path
                if path:
                    return path
        return None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self.diverged or not isinstance(loss, torch.Tensor):
            return
        self.pending.append(loss.detach().float())
        if len(self.pending) >= self.check_every_n_steps:
            self.check_pending(trainer)

    def check_pending(self, trainer: L.Trainer) -> str | None:
        """Read the losses not read yet (AdapterCheckpoint calls this before it writes); on trouble stop the run.
        Returns the reason, or None."""
        if self.diverged or not self.pending:
            return self.diverged
        losses, self.pending = torch.stack(self.pending).tolist(), []
        reason = next((r for r in map(self.problem, losses) if r is not None), None)
        if reason is None:
            return None
        self.diverged = reason
        trainer.should_stop = True
        checkpoint = self.last_good_checkpoint(trainer)
        where = f"The last good checkpoint is {checkpoint}" if checkpoint else "No checkpoint was written before it"
        self.message = (
            f"DivergenceGuard stopped training at global step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{reason}. {where}. Lower the learning rate, check the data's labels, or resume from it with "
            "--ckpt_path."
        )
        if trainer.is_global_zero:
            log.error(self.message)
        return reason

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "best_mean": self.best_mean}

    def load_state_dict(self, state_dict: dict) -> None:
        self.recent = deque(state_dict.get("recent", []), maxlen=self.window)
        self.best_mean = state_dict.get("best_mean", math.inf)
