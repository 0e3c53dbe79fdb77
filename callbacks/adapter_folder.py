"""Atomic pieces of a checkpoint's adapter folder: hidden partial names, folder replacement, peft's two files."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


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


def partial_name(path: Path) -> Path:
    """A hidden name beside ``path`` that matches no checkpoint pattern (``last*.ckpt``, ``*.ckpt``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def replace_folder(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing an older ``target`` without a moment where
    neither exists under a checkpoint-looking name."""
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        try:
            os.replace(source, target)
        except BaseException:
            os.replace(old, target)  # the previous folder goes back under its name
            raise
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
