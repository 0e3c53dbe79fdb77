"""AdapterCheckpoint: resumable adapter-only .ckpt files, each with a plain peft adapter folder beside it.

Every write is atomic: the .ckpt is written under a hidden temporary name in the same folder and renamed; the
adapter folder is written to a temporary folder and renamed. A write that fails (a full disk) removes its partial
file; a process killed mid-write leaves a ``.*.partial`` file that no loader takes for a checkpoint (the next run in
the folder removes it), and the previous checkpoint untouched.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_utilities.core.apply_func import apply_to_collection

from lit_llama_lab.io import partial_name
from lit_llama_lab.model.fsdp import gather_adapter_state_dict
from lit_llama_lab.train.callbacks.adapter_folder import adapter_metadata, checkpoint_write, folder_writer
from lit_llama_lab.train.callbacks.ordered_writer import OrderedWriter
from lit_llama_lab.train.callbacks.run_folder import RunFolderError, RunLock, check_new_run, no_checkpoint_message
from lit_llama_lab.train.resume import RUN_SETTINGS, run_settings

log = logging.getLogger(__name__)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def validates_after_batch(trainer: L.Trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch (its own test; Lightning 2.6)."""
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning: save at the batch end, the score may be a step old
        return False


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for adapters: every ``every_n_train_steps`` and at each epoch end, best
    ``save_top_k`` by ``monitor`` plus ``last``.

    Each ``NAME.ckpt`` (adapter weights, optimizer, loops, callbacks; the module drops the frozen base) has a folder
    ``NAME/`` beside it with ``adapter_config.json``, ``adapter_model.safetensors`` and ``lit_llama_lab.json``
    (base model, quantization, step, epoch, monitor, score, run), loadable by
    ``lit_llama_lab.model.load.load_for_inference`` or plain peft.

    Without ``dirpath`` checkpoints go to ``<logger save_dir>/<logger name>/checkpoints``, shared by all versions of
    that run name, so ``--ckpt_path last`` finds the newest ``last.ckpt`` of the previous attempt.
    That folder belongs to one run (:mod:`lit_llama_lab.train.callbacks.run_folder`): a fit that does not resume from a checkpoint in it
    is refused while it holds checkpoints, and a lock file refuses a second live writer; ``-v1`` names are never
    made. ``--ckpt_path last`` with no ``last.ckpt`` there is an error naming the folder.
    No checkpoint is written once a DivergenceGuard has tripped, so ``last`` stays the last good one.
    ``async_write`` (one process only): the state is copied to host memory at the save point and written to disk by
    a background thread while training goes on, in order (removals of old checkpoints queue behind the writes);
    the run waits for the writes when training ends or fails. Each write stays atomic, so a crash loses only the
    queued writes, never an earlier checkpoint; a write that fails (a full disk) removes its partial file, and
    nothing queued after it runs, so the previous checkpoints stay as they were.
    ``last`` is also written at the run's last step (``max_steps``), and on SIGTERM (a scheduler's stop) at the end
    of the current batch, before Lightning stops.
    ``enable_version_counter`` is off: a same-named checkpoint of this run is replaced (atomically), never made
    ``-v1``. Other arguments are ModelCheckpoint's.
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
        enable_version_counter: bool = False,
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
            enable_version_counter=enable_version_counter,  # off: never `last-v1`, a folder holds one run's files
            **kwargs,
        )
        # ModelCheckpoint takes steps or epochs; both triggers work side by side, so set the epoch one after it.
        self._every_n_epochs = every_n_epochs
        self.async_write = async_write
        self._writer = OrderedWriter()
        self._final_after_validation = False  # the last step's `last` waits for the validation that follows it
        self._logger_dir = dirpath is None  # the folder comes from the logger's save_dir and name
        # the fit's ckpt_path: LabCLI sets it (check_fit); a script resuming from an explicit path sets it, or
        # trainer.ckpt_path, before trainer.fit, else the folder it resumes in counts as another run's
        self.resume_from: str | None = None
        self._found_last = False  # Lightning resolved ckpt_path="last" in this folder
        self._lock: RunLock | None = None

    def resolve_dir(self, trainer: L.Trainer) -> str:
        """The checkpoint folder: ``dirpath`` or ``<save_dir>/<name>/checkpoints`` of the first logger."""
        if self.dirpath is not None:
            return str(self.dirpath)
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and logger.save_dir is not None:
            return os.path.join(logger.save_dir, str(logger.name or ""), "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def rename_hint(self) -> str:
        """How a new run gets a checkpoint folder of its own, as a command-line option."""
        if self._logger_dir:
            return "--trainer.logger.init_args.name NAME"
        return "another dirpath for the AdapterCheckpoint callback"

    def check_fit(self, trainer: L.Trainer, ckpt_path: str | None) -> None:
        """Before anything loads: refuse a fit (resuming from ``ckpt_path``, or new) into a folder holding another
        run's checkpoints. Read-only, the same answer on every process; :meth:`setup` checks again and locks."""
        self.resume_from = None if ckpt_path is None else str(ckpt_path)
        check_new_run(Path(self.resolve_dir(trainer)), self.resume_from, self.rename_hint())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self.resolve_dir(trainer)
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._claim_folder(trainer)

    def _claim_folder(self, trainer: L.Trainer) -> None:
        """Rank 0 checks the folder is this run's and takes its lock; every rank raises the same refusal."""
        problem = None
        if trainer.is_global_zero:
            resume = self.resume_from or trainer.ckpt_path or ("last" if self._found_last else None)
            try:
                check_new_run(Path(self.dirpath), resume, self.rename_hint())
                self._lock = RunLock(Path(self.dirpath))
                self._lock.acquire()
            except RunFolderError as error:
                problem = str(error)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise RunFolderError(problem)

    def _release_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.resume_from, self._found_last = None, False

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self.dirpath = self.resolve_dir(trainer)
        found = super()._find_last_checkpoints(trainer)
        if not found:  # Lightning would warn and train from step 0
            raise RunFolderError(no_checkpoint_message(Path(self.dirpath)))
        self._found_last = True
        return found

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_SETTINGS] = run_settings(trainer)  # what a resume compares its trainer settings with

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._in_batch_end = True  # ModelCheckpoint asks _should_skip_saving_checkpoint after every batch
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False
        self._save_if_ending(trainer)

    def _save_if_ending(self, trainer: L.Trainer) -> None:
        """At the run's last step (``max_steps``) and after SIGTERM, write ``last`` now, whatever the schedule: the run
        ends after this batch, and its final state would otherwise be lost. Every process decides alike (the write
        is collective)."""
        stopping = trainer.received_sigterm
        if trainer.world_size > 1:
            stopping = trainer.strategy.reduce_boolean_decision(stopping, all=False)
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and not stopping and validates_after_batch(trainer):
            self._final_after_validation = True  # saved there, with the fresh score (and as a top-k candidate)
        elif stopping or final:
            self._save_last_now(trainer)

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

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
        if self._final_after_validation and not trainer.sanity_checking:
            self._final_after_validation = False
            self._save_last_now(trainer)

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
        if self._background(trainer):
            self._writer.submit(job)
        else:
            job()

    def raise_write_errors(self) -> None:
        """Re-raise the first error of a finished background write (a full disk, say) in the training thread."""
        self._writer.raise_errors()

    def wait_for_writes(self) -> None:
        """Block until every queued checkpoint write and removal is on disk; re-raise the first error."""
        self._writer.wait()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        partial = partial_name(target)
        adapter = gather_adapter_state_dict(trainer.lightning_module)  # collective under FSDP
        if not self._background(trainer):
            with checkpoint_write(target, partial):
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
            with checkpoint_write(target, partial):
                io.save_checkpoint(checkpoint, partial)
                write_folder()
                os.replace(partial, target)

        self._run(trainer, write)
        self._after_save(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._final_after_validation:  # the validation announced did not come: save the final state now
            self._final_after_validation = False
            self._save_last_now(trainer)
        self.wait_for_writes()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._writer.drain()  # the checkpoints before the failure still reach the disk; the first error is the one raised
        if trainer.received_sigterm and trainer.is_global_zero and self.last_model_path:
            log.warning("Stopped by SIGTERM. The newest checkpoint is %s; continue with --ckpt_path last.",
                        self.last_model_path)
        self._release_folder()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            self.wait_for_writes()
        finally:
            self._writer.close()
            self._release_folder()

    def _after_save(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint's bookkeeping (lightning 2.6), for the final name
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def write_adapter_folder(self, trainer: L.Trainer, folder: Path, adapter: dict | None = None) -> None:
        """Write the peft adapter folder ``folder`` (temporary folder, then rename).

        ``adapter``: full adapter weights keyed as the module's state dict (from ``gather_adapter_state_dict``,
        needed under FSDP, where the model holds shards); default: the model's own parameters.
        """
        module = trainer.lightning_module
        self._folder_writer(trainer, folder, gather_adapter_state_dict(module) if adapter is None else adapter)()

    def _folder_writer(self, trainer: L.Trainer, folder: Path, adapter: dict):
        score = self._monitor_candidates(trainer).get(self.monitor) if self.monitor else None
        return folder_writer(trainer, folder, adapter, adapter_metadata(trainer, self.monitor, score))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        def remove() -> None:
            super(AdapterCheckpoint, self)._remove_checkpoint(trainer, filepath)
            folder = Path(filepath).with_suffix("")
            if trainer.is_global_zero and (folder / "adapter_config.json").is_file():
                shutil.rmtree(folder)

        self._run(trainer, remove)
