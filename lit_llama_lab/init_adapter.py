"""Start a run from an existing adapter (``--model.init_adapter PATH``): the seed's two-step path, a chat adapter
first (e.g. ``configs/finetome.yaml``), then the task on top of it."""

from __future__ import annotations

import json
from pathlib import Path


def _identity(name: str) -> tuple[str, str]:
    """What a base model name resolves to (kind, location), so ``smollm2-135m`` and its spelled-out forms compare
    equal; a name that no longer resolves here (a moved folder) is compared as written."""
    from lit_llama_lab.models import ModelNotFoundError, resolve_model_source

    try:
        source = resolve_model_source(name)
    except ModelNotFoundError:
        return ("name", str(name))
    return (source.kind, source.location)


def read_adapter_settings(folder: Path) -> tuple[dict, str | None]:
    """``(adapter_config.json, base model)`` of an adapter folder (base from ``lit_llama_lab.json`` or peft's
    ``base_model_name_or_path``); raises naming the folder when it is not an adapter folder."""
    from lit_llama_lab.models import ADAPTER_METADATA

    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"init_adapter {str(folder)!r} is no adapter folder (it needs adapter_config.json and "
                         "adapter_model.safetensors): pass a checkpoint folder such as runs/finetome/checkpoints/last.")
    config = json.loads(config_file.read_text())
    meta_file = folder / ADAPTER_METADATA
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return config, meta.get("base_model") or config.get("base_model_name_or_path")


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
    """The weights of the adapter folder ``folder``, after :func:`check_compatible` (so a wrong adapter is refused
    before any model loads)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config, saved_base = read_adapter_settings(folder)
    check_compatible(folder, config, saved_base, base, lora)
    try:
        return load_file(str(folder / "adapter_model.safetensors"))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the same fix
        raise ValueError(f"init_adapter {str(folder / 'adapter_model.safetensors')!r} cannot be read ({error}): "
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
