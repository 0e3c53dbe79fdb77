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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_utilities.core.apply_func import apply_to_collection

from lit_llama_lab.fsdp import gather_adapter_state_dict
from lit_llama_lab.models import ADAPTER_METADATA

log = logging.getLogger(__name__)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


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

    ``peft_model``: the peft model, or its adapter config. ``adapter`` is keyed as the QLoRAModule's state dict
    (``model.base_model…lora_A.default.weight``). peft's own save_pretrained cannot be used under FSDP: it reads the
    adapter key prefixes from the module tree, whose names then hold FSDP wrapper prefixes that the gathered state
    dict has not.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config["default"] if hasattr(peft_model, "peft_config") else peft_model)
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

    Without ``dirpath`` checkpoints go to ``<logger save_dir>/<logger name>/checkpoints``, shared by all versions of
    that run name, so ``--ckpt_path last`` finds the newest ``last.ckpt`` of the previous attempt.
    No checkpoint is written once a DivergenceGuard has tripped, so ``last`` stays the last good one.
    ``async_write`` (one process only): the state is copied to host memory at the save point and written to disk by
    a background thread while training goes on, in order (removals of old checkpoints queue behind the writes);
    the run waits for the writes when training ends or fails. Each write stays atomic, so a crash loses only the
    queued writes, never an earlier checkpoint.
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
        async_write: bool = True,
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
        self.async_write = async_write
        self._writer: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []

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

    def _background(self, trainer: L.Trainer) -> bool:
        return self.async_write and trainer.world_size == 1

    def _run(self, trainer: L.Trainer, job) -> None:
        """Run ``job`` now, or queue it on the writer thread (in order) when writing in the background."""
        if not self._background(trainer):
            job()
            return
        self.raise_write_errors()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-checkpoint")
        self._jobs.append(self._writer.submit(job))

    def raise_write_errors(self) -> None:
        """Re-raise the first error of a finished background write (a full disk, say) in the training thread."""
        for job in [j for j in self._jobs if j.done()]:
            self._jobs.remove(job)
            job.result()

    def wait_for_writes(self) -> None:
        """Block until every queued checkpoint write and removal is on disk; re-raise the first error."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        partial = _partial_name(target)
        adapter = gather_adapter_state_dict(trainer.lightning_module)  # collective under FSDP
        if not self._background(trainer):
            trainer.save_checkpoint(partial, self.save_weights_only)  # collective: every rank calls, rank 0 writes
            if trainer.is_global_zero:
                self.write_adapter_folder(trainer, target.with_suffix(""), adapter)
                os.replace(partial, target)
            self._after_save(trainer, filepath)
            return
        # a snapshot in host memory (the copy waits for the GPU once); the thread only serializes and renames
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        checkpoint = copy.deepcopy(apply_to_collection(checkpoint, torch.Tensor, _to_host))
        adapter = apply_to_collection(adapter, torch.Tensor, _to_host)
        write_folder = self._folder_writer(trainer, target.with_suffix(""), adapter)
        io = trainer.strategy.checkpoint_io

        def write() -> None:
            io.save_checkpoint(checkpoint, partial)
            write_folder()
            os.replace(partial, target)

        self._run(trainer, write)
        self._after_save(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.wait_for_writes()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:  # the checkpoints before the failure still reach the disk; the first error is the one raised
            job.exception()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.wait_for_writes()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

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
        self._folder_writer(trainer, folder, gather_adapter_state_dict(module) if adapter is None else adapter)()

    def _folder_writer(self, trainer: L.Trainer, folder: Path, adapter: dict):
        """A function that writes the adapter folder: config and metadata are taken now, the disk work when called."""
        config = copy.deepcopy(trainer.lightning_module.model.peft_config["default"])
        metadata = json.dumps(self.adapter_metadata(trainer), indent=2)

        def write() -> None:
            partial = _partial_name(folder)
            shutil.rmtree(partial, ignore_errors=True)
            write_peft_files(config, adapter, partial)
            (partial / ADAPTER_METADATA).write_text(metadata)
            replace_folder(partial, folder)

        return write

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        def remove() -> None:
            super(AdapterCheckpoint, self)._remove_checkpoint(trainer, filepath)
            folder = Path(filepath).with_suffix("")
            if trainer.is_global_zero and (folder / "adapter_config.json").is_file():
                shutil.rmtree(folder)

        self._run(trainer, remove)
