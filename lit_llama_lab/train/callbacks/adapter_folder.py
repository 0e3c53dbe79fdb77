"""The plain peft adapter folder written beside each checkpoint (``NAME/``: ``adapter_config.json``,
``adapter_model.safetensors``, ``lit_llama_lab.json``), and the failure of a checkpoint write."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from lit_llama_lab.io import partial_name, replace_folder
from lit_llama_lab.model.adapters import ADAPTER_METADATA, write_peft_files


class CheckpointWriteError(OSError):
    """A checkpoint write that failed (a full disk): nothing half-written is left, the earlier checkpoints are intact."""


@contextmanager
def checkpoint_write(target: Path, partial: Path) -> Iterator[None]:
    """Around the write of ``target`` through ``partial``: a failure removes ``partial`` and is re-raised as
    :class:`CheckpointWriteError` naming the checkpoint and the way on."""
    try:
        yield
    except Exception as error:
        raise CheckpointWriteError(
            f"Could not write the checkpoint {target} ({type(error).__name__}: {error}). Nothing half-written is left "
            f"and the earlier checkpoints in {target.parent} are intact. Free space (or fix the folder), then continue "
            "with --ckpt_path last."
        ) from error
    finally:
        partial.unlink(missing_ok=True)  # a success renamed it already


def adapter_metadata(trainer: L.Trainer, monitor: str | None, score) -> dict:
    """What ``lit_llama_lab.json`` records: base, quantization, the answer style trained on, position, the monitored
    score, the run."""
    hparams = trainer.lightning_module.hparams
    logger = trainer.loggers[0] if trainer.loggers else None
    data = getattr(trainer, "datamodule", None)
    return {
        "base_model": hparams.get("name_or_path"),
        "quantize": hparams.get("quantize"),
        "answer_style": getattr(data, "hparams", {}).get("answer_style"),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "monitor": monitor,
        "score": None if score is None else float(score),
        "run": None if logger is None else f"{logger.name}/version_{logger.version}",
    }


def folder_writer(trainer: L.Trainer, folder: Path, adapter: dict[str, torch.Tensor],
                  metadata: dict) -> Callable[[], None]:
    """A function that writes the adapter folder ``folder`` (a staged folder, then a rename): the adapter config and
    ``metadata`` are taken now, the disk work happens when it is called (perhaps on the writer thread)."""
    config = copy.deepcopy(trainer.lightning_module.model.peft_config["default"])
    text = json.dumps(metadata, indent=2)

    def write() -> None:
        partial = partial_name(folder)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write_peft_files(config, adapter, partial)
            (partial / ADAPTER_METADATA).write_text(text)
            replace_folder(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # only left when the write failed

    return write
