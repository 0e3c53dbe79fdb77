"""Adapter folders (peft's ``adapter_config.json`` + ``adapter_model.safetensors``, and our ``lit_llama_lab.json``):
checked before a base loads under them, written as peft writes them, and used to start a run
(``--model.init_adapter PATH``: the seed's two-step path, a chat adapter first, then the task on top of it).

peft reads ``adapter_model.safetensors`` only after the base has loaded, and then reports a missing file as a hub
error ("Repo id must be a string") and a truncated one as a bare SafetensorError without its path: hence the checks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

ADAPTER_METADATA = "lit_llama_lab.json"  # beside adapter_config.json: base name, quantize, step, metrics
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter folder whose weights file is missing or unreadable; the message names the file and the fix."""


def unwrap_peft(model):
    """The causal LM under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_adapter_folder(path: str | Path) -> bool:
    """True for a peft adapter folder (``adapter_config.json`` + weights), as checkpoints and exports write."""
    return (Path(path) / "adapter_config.json").is_file()


def check_adapter_weights(folder: str | Path) -> Path:
    """Return ``folder/adapter_model.safetensors`` once its header reads and covers the file; raise
    :class:`AdapterFileError` naming the path and the fix otherwise."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    fix = ("Pick another checkpoint (another epoch's folder beside it), or write this one again: an interrupted copy "
           "or a full disk leaves such files")
    if not path.is_file():
        raise AdapterFileError(f"The adapter folder {folder} has no {ADAPTER_WEIGHTS} (only the config is there). {fix}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise AdapterFileError(f"{path} is truncated or corrupt ({error}). {fix}.") from error
    return path


def adapter_metadata(folder: Path) -> dict:
    """``lit_llama_lab.json`` of an adapter folder (``{}`` when absent), with ``base_model`` filled from peft's
    ``base_model_name_or_path`` when missing."""
    meta_file = folder / ADAPTER_METADATA
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not meta.get("base_model"):
        meta["base_model"] = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return meta


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
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.inference_mode = True
    config.save_pretrained(str(folder))


def _identity(name: str) -> tuple[str, str]:
    """What a base model name resolves to (kind, location), so ``smollm2-135m`` and its spelled-out forms compare
    equal; a name that no longer resolves here (a moved folder) is compared as written."""
    from lit_llama_lab.model.source import ModelNotFoundError, resolve_model_source

    try:
        source = resolve_model_source(name)
    except ModelNotFoundError:
        return ("name", str(name))
    return (source.kind, source.location)


def read_adapter_settings(folder: Path) -> tuple[dict, str | None]:
    """``(adapter_config.json, base model)`` of an adapter folder (base from ``lit_llama_lab.json`` or peft's
    ``base_model_name_or_path``); raises naming the folder when it is not an adapter folder."""
    config_file, weights = folder / "adapter_config.json", folder / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"init_adapter {str(folder)!r} is no adapter folder (it needs adapter_config.json and "
                         "adapter_model.safetensors): pass a checkpoint folder such as runs/finetome/checkpoints/last.")
    return json.loads(config_file.read_text()), adapter_metadata(folder)["base_model"]


def check_compatible(folder: Path, config: dict, saved_base: str | None, base: str, lora) -> None:
    """Refuse an adapter trained on another base or with other LoRA shapes or scaling, naming both values."""
    if saved_base is not None and _identity(saved_base) != _identity(base):
        raise ValueError(f"init_adapter {str(folder)!r} was trained on base {saved_base!r}, but this run's base is "
                         f"{base!r}: pass --model.name_or_path {saved_base} or an adapter of {base}.")
    pairs = [("r", "r", lora.r), ("lora_alpha", "alpha", lora.alpha), ("use_rslora", "use_rslora", lora.use_rslora),
             ("use_dora", "use_dora", lora.use_dora)]
    for key, option, mine in pairs:
        saved = config.get(key)
        if saved is not None and saved != mine:
            raise ValueError(f"init_adapter {str(folder)!r} has {option}={saved}, but this run has lora.{option}={mine}: "
                             f"pass --model.lora.{option} {saved} to continue it.")
    saved_targets, targets = set(config.get("target_modules") or []), set(lora.target_modules)
    if saved_targets and saved_targets != targets:
        raise ValueError(f"init_adapter {str(folder)!r} adapts {sorted(saved_targets)}, but this run's "
                         f"lora.target_modules are {sorted(targets)}: pass the same target modules.")


def read_init_adapter(folder: str | Path, base: str, lora) -> dict:
    """The weights of the adapter folder ``folder``, after :func:`check_compatible` with the base name and the LoRA
    settings ``lora`` (so a wrong adapter is refused before any model loads)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config, saved_base = read_adapter_settings(folder)
    check_compatible(folder, config, saved_base, base, lora)
    try:
        return load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the same fix
        raise ValueError(f"init_adapter {str(folder / ADAPTER_WEIGHTS)!r} cannot be read ({error}): "
                         "pick another checkpoint.") from error


def apply_init_adapter(peft_model, state: dict, folder: str | Path) -> None:
    """Copy adapter weights (from :func:`read_init_adapter`) into ``peft_model``'s adapters; raises when one is
    missing or left over."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unset = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or unset:
        raise ValueError(f"init_adapter {str(folder)!r} does not fit this model: {len(result.unexpected_keys)} "
                         f"unexpected and {len(unset)} missing adapter weights (e.g. "
                         f"{(list(result.unexpected_keys) + unset)[0]}).")
