"""The HF folder a base model loads from: a GGUF (the embedded SmolLM2, or a path) dequantized once into a clean
safetensors folder under the cache, the random ``tiny-random`` model written once, a local folder as it is, or a hub
id (downloaded only when the hub answers, :mod:`lit_llama_lab.model.hub`). Each folder is written to a hidden sibling
and renamed, so a crash never leaves one that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from lit_llama_lab.io import write_once
from lit_llama_lab.model.source import TINY_RANDOM, ModelSource, cache_dir, embedded_gguf_path, resolve_model_source
from lit_llama_lab.model.tokens import fix_special_tokens

log = logging.getLogger(__name__)


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def converted_folder(source: ModelSource) -> Path:
    """The HF folder for ``source``: converted once from GGUF (atomically) and reused, or the folder itself."""
    if source.kind == "hub":
        from lit_llama_lab.model.hub import hub_model_location

        return Path(hub_model_location(source.location))  # the hub id, or its cached copy when offline
    if source.kind == "folder":
        return Path(source.location)
    if source.location == TINY_RANDOM:
        target = cache_dir() / "converted" / "tiny-random-llama"
        return target if (target / "config.json").is_file() else make_tiny_llama(target)
    gguf = embedded_gguf_path(source.location) if source.kind == "embedded" else Path(source.location)
    target = cache_dir() / "converted" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    convert_gguf(gguf, target)
    return target


def model_folder(name_or_path: str) -> Path:
    """The HF folder (or hub id) a base model name loads from: :func:`converted_folder` of its resolved source."""
    return converted_folder(resolve_model_source(name_or_path))


def convert_gguf(gguf: Path, target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize a GGUF checkpoint into a clean HF safetensors folder at ``target``.

    transformers loads GGUF but refuses to quantize it with bitsandbytes or to ``save_pretrained`` it, so the
    weights are copied into a plain model built from the same config. Written to a temporary sibling folder and
    renamed, so a crash never leaves a folder that looks complete.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("Converting %s into %s (once)", gguf, target)
    kwargs = {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kwargs)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    fix_special_tokens(tokenizer, clean)
    return write_once(target, lambda folder: (clean.save_pretrained(folder), tokenizer.save_pretrained(folder)))


def make_tiny_llama(target: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's tokenizer to ``target``, atomically.

    Same architecture and tokenizer as the real model, so every code path runs, in seconds on a CPU.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(converted_folder(ModelSource("embedded", "smollm2-135m")))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # a cold cache must not shift the caller's RNG (LoRA init follows)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return write_once(target, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
