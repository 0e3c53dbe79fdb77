"""AdapterCheckpoint: resumable adapter-only .ckpt files, each with a plain peft adapter folder beside it.

Every write is atomic: the .ckpt is written under a hidden temporary name in the same folder and renamed; the
adapter folder is written to a temporary folder and renamed. A crash mid-write leaves a ``.*.partial`` file that
no loader takes for a checkpoint, and the previous checkpoint untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_llama_lab.fsdp import gather_adapter_state_dict
from lit_llama_lab.models import ADAPTER_METADATA

log = logging.getLogger(__name__)


def _partial_name(path: Path) -> Path:
    """A hidden name beside ``path`` that matches no checkpoint pattern (``last*.ckpt``, ``*.ckpt``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def replace_folder(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing an older ``target`` without a moment where
    neither exists under a checkpoint-looking name."""
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def write_peft_files(peft_model, adapter: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``, as peft's save_pretrained does.

    ``adapter`` is keyed as the QLoRAModule's state dict (``model.base_model…lora_A.default.weight``). peft's own
    save_pretrained cannot be used under FSDP: it reads the adapter key prefixes from the module tree, whose names
    then hold FSDP wrapper prefixes that the gathered state dict has not.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config["default"])
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    state = {tuner._remove_adapter_name_from_key(name.removeprefix("model."), "default"): value.contiguous()
             for name, value in adapter.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.inference_mode = True
    config.save_pretrained(str(folder))


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for adapters: every ``every_n_train_steps`` and at each epoch end, best
    ``save_top_k`` by ``monitor`` plus ``last``.

    Each ``NAME.ckpt`` (adapter weights, optimizer, loops, callbacks; the module drops the frozen base) has a folder
    ``NAME/`` beside it with ``adapter_config.json``, ``adapter_model.safetensors`` and ``lit_llama_lab.json``
    (base model, quantization, step, epoch, monitor, score, run), loadable by
    ``lit_llama_lab.models.load_for_inference`` or plain peft.

    When ``last`` is saved at the step a top-k checkpoint was just written (each epoch end whose score made the top
    k), it is hard-linked to that one's files rather than written again.

    Without ``dirpath`` checkpoints go to ``<logger save_dir>/<logger name>/checkpoints``, shared by all versions of
    that run name, so ``--ckpt_path last`` finds the newest ``last.ckpt`` of the previous attempt.
    No checkpoint is written once a DivergenceGuard has tripped, so ``last`` stays the last good one.
    Other arguments are ModelCheckpoint's.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "{epoch}-{step}",
        monitor: str | None = "val_loss",
        mode: str = "min",
        save_top_k: int = 2,
        save_last: bool = True,
        every_n_train_steps: int | None = None,
        every_n_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=None if every_n_train_steps else every_n_epochs,
            **kwargs,
        )
        # ModelCheckpoint takes steps or epochs; both triggers work side by side, so set the epoch one after it.
        self._every_n_epochs = every_n_epochs

    def resolve_dir(self, trainer: L.Trainer) -> str:
        """The checkpoint folder: ``dirpath`` or ``<save_dir>/<name>/checkpoints`` of the first logger."""
        if self.dirpath is not None:
            return str(self.dirpath)
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and logger.save_dir is not None:
            return os.path.join(logger.save_dir, str(logger.name or ""), "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self.resolve_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self.dirpath = self.resolve_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._in_batch_end = True  # ModelCheckpoint asks _should_skip_saving_checkpoint after every batch
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        # A guard that reads losses every few batches reads the pending ones before a save, so no diverged adapter
        # is written; only when a save may follow, since reading a GPU loss waits for the GPU.
        saving_step = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        flush = saving_step or not getattr(self, "_in_batch_end", False)
        diverged = any(cb.check_pending(trainer) if flush and hasattr(cb, "check_pending") else getattr(cb, "diverged", None)
                       for cb in trainer.callbacks)
        return bool(diverged) or super()._should_skip_saving_checkpoint(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        """``last`` is the newest state at every epoch save point. Lightning 2.6 writes it there only when a top-k
        checkpoint was written at the same step, so once the monitored score stops improving ``last`` would stay at
        the best epoch: what evaluation calls the final model, and where ``--ckpt_path last`` resumes."""
        if (self.save_last and self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
                and self._last_global_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        # when a top-k checkpoint of this very step was just written, `last` is the same bytes: hard-link it
        same_step = self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved
        self._link_source = self._last_checkpoint_saved if same_step else None
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._link_source = None

    def _link_saved(self, source: Path, target: Path) -> bool:
        """Make ``target`` (+ its adapter folder) hard links to the files of ``source``, saved at the same step,
        instead of serializing the same state again. Atomic like a write; False where links are not possible."""
        try:
            partial, folder_partial = _partial_name(target), _partial_name(target.with_suffix(""))
            shutil.rmtree(folder_partial, ignore_errors=True)
            shutil.copytree(source.with_suffix(""), folder_partial, copy_function=os.link)
            partial.unlink(missing_ok=True)
            os.link(source, partial)
        except OSError as error:  # a file system without hard links: write the checkpoint instead
            log.debug("Cannot hard-link %s to %s (%s); writing it.", source, target, error)
            return False
        replace_folder(folder_partial, target.with_suffix(""))
        os.replace(partial, target)
        return True

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        source = getattr(self, "_link_source", None)
        if (source and trainer.world_size == 1 and Path(source) != target and Path(source).is_file()
                and self._link_saved(Path(source), target)):
            self._after_save(trainer, filepath)
            return
        partial = _partial_name(target)
        adapter = gather_adapter_state_dict(trainer.lightning_module)  # collective under FSDP
        trainer.save_checkpoint(partial, self.save_weights_only)  # collective: every rank calls, rank 0 writes
        if trainer.is_global_zero:
            self.write_adapter_folder(trainer, target.with_suffix(""), adapter)
            os.replace(partial, target)
        self._after_save(trainer, filepath)

    def _after_save(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint's bookkeeping (lightning 2.6), for the final name
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def adapter_metadata(self, trainer: L.Trainer) -> dict:
        """What ``lit_llama_lab.json`` records: base, quantization, position, score, run."""
        hparams = trainer.lightning_module.hparams
        score = self._monitor_candidates(trainer).get(self.monitor) if self.monitor else None
        logger = trainer.loggers[0] if trainer.loggers else None
        return {
            "base_model": hparams.get("name_or_path"),
            "quantize": hparams.get("quantize"),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "monitor": self.monitor,
            "score": None if score is None else float(score),
            "run": None if logger is None else f"{logger.name}/version_{logger.version}",
        }

    def write_adapter_folder(self, trainer: L.Trainer, folder: Path, adapter: dict | None = None) -> None:
        """Write the peft adapter folder ``folder`` (temporary folder, then rename).

        ``adapter``: full adapter weights keyed as the module's state dict (from ``gather_adapter_state_dict``,
        needed under FSDP, where the model holds shards); default: the model's own parameters.
        """
        module = trainer.lightning_module
        adapter = gather_adapter_state_dict(module) if adapter is None else adapter
        partial = _partial_name(folder)
        shutil.rmtree(partial, ignore_errors=True)
        write_peft_files(module.model, adapter, partial)
        (partial / ADAPTER_METADATA).write_text(json.dumps(self.adapter_metadata(trainer), indent=2))
        replace_folder(partial, folder)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        folder = Path(filepath).with_suffix("")
        if trainer.is_global_zero and (folder / "adapter_config.json").is_file():
            shutil.rmtree(folder)
