"""An adapter folder's weights, checked before a base model is loaded under them.

peft reads ``adapter_model.safetensors`` only after the base has loaded, and then reports a missing file as a hub
error ("Repo id must be a string") and a truncated one as a bare SafetensorError without its path.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter folder whose weights file is missing or unreadable; the message names the file and the fix."""


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
