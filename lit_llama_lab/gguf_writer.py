"""Write a Llama-architecture model as a GGUF file with the ``gguf`` package, without llama.cpp's scripts.

What goes in: llama.cpp's ``llama.*`` hyper-parameters, every weight under its GGUF name (Q and K rows permuted the
way llama.cpp's rotary kernels expect), the byte-level BPE tokenizer (tokens, merges, token types, special token
ids) and the chat template. Read back by llama.cpp, Ollama and transformers (``gguf_file=``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

GgufType = Literal["f16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f16", "q8_0")


def permute_for_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection from HF's rotate-half layout to llama.cpp's interleaved pairs.

    The inverse of what transformers' GGUF loader (``LlamaTensorProcessor._reverse_permute_weights``) does.
    ``n_head`` is the number of heads of this projection (key/value heads for K).
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(qtype: GgufType, array: np.ndarray):
    """llama.cpp's choice: 1-D tensors (norms) stay F32; matrices become F16 or Q8_0 (rows of 32 values)."""
    import gguf

    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def add_tensors(writer, state_dict: dict[str, torch.Tensor], config, qtype: GgufType) -> None:
    """Add every weight of an HF Llama ``state_dict`` to ``writer`` under its GGUF name, converted to ``qtype``."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd; an output.weight would untie them on load
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"No GGUF name for the weight {hf_name!r}: is this a Llama-architecture model?")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith("attn_q"):
            array = permute_for_rotary(array, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            array = permute_for_rotary(array, config.num_key_value_heads)
        kind = _tensor_type(qtype, array)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"{gguf_name}.{suffix}", array)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"{gguf_name}.{suffix}", array.astype(np.float16))
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", gguf.quants.quantize(array, kind), raw_dtype=kind)


def add_hyperparameters(writer, config, qtype: GgufType, name: str) -> None:
    """llama.cpp's ``llama.*`` keys from an HF ``LlamaConfig``. Rope scaling other than default is refused."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export supports default rotary embeddings only, not {rope.get('rope_type')!r}.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str = "gpt2") -> None:
    """The byte-level BPE vocabulary, merges, token types, special ids and chat template of ``tokenizer``.

    Tokens are written in the byte-level spelling of ``tokenizer.json`` (``Ġ`` for a space), as llama.cpp's
    ``gpt2`` model expects. Added special tokens are CONTROL, other added tokens USER_DEFINED; ids past the
    tokenizer's vocabulary (embedding rows kept for padding) get ``[PAD<id>]`` placeholders, as llama.cpp does.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers only, not {model.get('type')!r}.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(
    path: Path, state_dict: dict[str, torch.Tensor], config, tokenizer, qtype: GgufType = "f16",
    name: str = "model", pre: str = "gpt2",
) -> Path:
    """Write a complete GGUF file at ``path``, atomically (a temp file in the same folder, then renamed).

    ``state_dict`` holds HF Llama weight names; quantize from float32 weights for the least rounding.
    """
    import gguf

    if qtype not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF type {qtype!r}; choose from {', '.join(GGUF_TYPES)}.")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        add_hyperparameters(writer, config, qtype, name)
        add_tokenizer(writer, tokenizer, config.vocab_size, pre)
        add_tensors(writer, state_dict, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("Wrote %s (%s, %.1f MB)", path, qtype, path.stat().st_size / 1e6)
    return path


def source_pre_tokenizer(gguf_path: Path | None) -> str:
    """The ``tokenizer.ggml.pre`` of the GGUF a base model came from (``smollm`` for SmolLM2), else ``gpt2``.

    llama.cpp picks its pre-tokenizer split by this name; keeping the source's name keeps its behaviour.
    """
    if gguf_path is None or not Path(gguf_path).is_file():
        return "gpt2"
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else "gpt2"
