"""Which models the UI offers, with readable names, and a small LRU that keeps the recently used ones loaded.

Found under the runs folder: adapter folders (``adapter_config.json``, with ``lit_llama_lab.json`` beside it when
a checkpoint wrote one), merged exports (``config.json`` + ``*.safetensors``) and ``.gguf`` files.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from lit_llama_lab.model.adapters import ADAPTER_METADATA, AdapterFileError, check_adapter_weights, is_adapter_folder
from lit_llama_lab.model.source import EMBEDDED_MODELS, TINY_RANDOM

DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class ModelChoice:
    """One dropdown entry: the label shown and the value passed to ``load_for_inference``."""

    label: str
    value: str
    kind: str  # "base" | "adapter" | "merged" | "gguf"


class ModelUnavailableError(RuntimeError):
    """A listed model whose files are gone (deleted after the list was made)."""


def _score_text(meta: dict) -> str:
    score, monitor = meta.get("score"), meta.get("monitor")
    if score is None:
        return ""
    value = f"{score:.4g}" if isinstance(score, (int, float)) else str(score)
    return f"{monitor}={value}" if monitor else f"score={value}"


def adapter_label(folder: Path, runs_dir: Path) -> str:
    """``where · version · step N · val_loss=0.123 (adapter)``.

    ``where`` is the folder's path under ``runs_dir`` without its ``checkpoints`` part (``emoji/last``): unique, where
    the run name in ``lit_llama_lab.json`` is not (two save_dirs may each hold a run ``debug/version_0``). The
    version, step and score come from that file when a checkpoint wrote it.
    """
    meta_file = folder / ADAPTER_METADATA
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        meta = {}
    parts = ["/".join(p for p in Path(_relative(folder, runs_dir)).parts if p != "checkpoints") or folder.name]
    run = str(meta.get("run") or "")
    if "/" in run:  # "name/version_N": the name is in the path already
        parts.append(run.rsplit("/", 1)[1])
    if meta.get("global_step") is not None:
        parts.append(f"step {meta['global_step']}")
    if meta.get("epoch") is not None and meta.get("global_step") is None:
        parts.append(f"epoch {meta['epoch']}")
    if _score_text(meta):
        parts.append(_score_text(meta))
    return " · ".join(parts) + " (adapter)"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _is_merged_export(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and not is_adapter_folder(folder)


def scan_models(runs_dir: str | Path, extra: Iterable[str] = (), base: str = DEFAULT_BASE) -> list[ModelChoice]:
    """The base model, then every adapter, merged export and ``.gguf`` under ``runs_dir`` (newest first), then
    ``extra`` paths or names. A missing ``runs_dir`` is an empty list, not an error: training may not have run."""
    runs = Path(runs_dir)
    choices = [ModelChoice(f"{base} (base)", base, "base")]
    found: list[tuple[float, ModelChoice]] = []
    if runs.is_dir():
        for config in _visible(runs, "adapter_config.json"):
            folder = config.parent
            found.append((folder.stat().st_mtime, ModelChoice(adapter_label(folder, runs), str(folder.resolve()), "adapter")))
        for config in _visible(runs, "config.json"):
            folder = config.parent
            if _is_merged_export(folder):
                found.append((folder.stat().st_mtime, ModelChoice(f"{_relative(folder, runs)} (merged)", str(folder.resolve()), "merged")))
        for gguf in _visible(runs, "*.gguf"):
            found.append((gguf.stat().st_mtime, ModelChoice(f"{_relative(gguf, runs)} (gguf)", str(gguf.resolve()), "gguf")))
    choices += [choice for _, choice in sorted(found, key=lambda item: item[0], reverse=True)]
    for item in extra:
        choices.append(_extra_choice(item))
    unique: dict[str, ModelChoice] = {}
    for choice in choices:
        unique.setdefault(choice.value, choice)
    return distinct_labels(list(unique.values()))


def distinct_labels(choices: list[ModelChoice]) -> list[ModelChoice]:
    """Choices whose labels are all different: a label shared by two models gets each one's full path appended."""
    counts = Counter(choice.label for choice in choices)
    return [replace(c, label=f"{c.label} [{c.value}]") if counts[c.label] > 1 else c for c in choices]


def _visible(root: Path, pattern: str) -> list[Path]:
    """Matches under ``root`` outside hidden folders (``.name.tmp`` folders are atomic writes still in progress)."""
    return [path for path in root.rglob(pattern) if not any(part.startswith(".") for part in path.relative_to(root).parts)]


def _extra_choice(item: str) -> ModelChoice:
    if item.lower() in EMBEDDED_MODELS or item.lower() == TINY_RANDOM:
        return ModelChoice(f"{item.lower()} (base)", item.lower(), "base")
    path = Path(item).expanduser()
    if is_adapter_folder(path):
        return ModelChoice(adapter_label(path, path.parent), str(path.resolve()), "adapter")
    if path.suffix.lower() == ".gguf":
        return ModelChoice(f"{path.name} (gguf)", str(path.resolve()), "gguf")
    if path.is_dir():
        return ModelChoice(f"{path.name} (merged)", str(path.resolve()), "merged")
    return ModelChoice(f"{item} (hub)", item, "base")


def check_available(value: str) -> None:
    """Raise :class:`ModelUnavailableError` when ``value`` is a path (absolute, as the scan lists) that is gone."""
    path = Path(value)
    if path.is_absolute() and not path.exists():
        raise ModelUnavailableError(
            f"The model at {value} no longer exists (deleted after the list was made). "
            "Press 'Refresh models' and pick another one."
        )
    if path.is_absolute() and path.is_dir() and not (is_adapter_folder(path) or (path / "config.json").is_file()):
        raise ModelUnavailableError(f"The model folder {value} is incomplete (no adapter_config.json or config.json).")
    if path.is_absolute() and is_adapter_folder(path):
        try:
            check_adapter_weights(path)
        except AdapterFileError as error:
            raise ModelUnavailableError(f"{error} Press 'Refresh models' and pick another one.") from error


class ModelCache:
    """Keeps the ``size`` most recently used ``(model, tokenizer)`` pairs; loads others on first use.

    Loading is serialised by a lock so two requests for the same model load it once. The one surprising thing:
    a cached model whose folder was deleted is dropped, so the UI never answers from a model that is gone.
    """

    def __init__(self, loader: Callable[[str], tuple], size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"The model cache size must be at least 1, got {size}.")
        self.loader = loader
        self.size = size
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, value: str) -> tuple:
        """``(model, tokenizer)`` for ``value``, loading it (and evicting the least recently used) if needed."""
        with self._lock:
            try:
                check_available(value)
            except ModelUnavailableError:
                self._models.pop(value, None)
                raise
            if value in self._models:
                self._models.move_to_end(value)
                return self._models[value]
            loaded = self.loader(value)
            self._models[value] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded

    def loaded(self) -> list[str]:
        """The cached values, least recently used first."""
        return list(self._models)
