"""Write a Llama-architecture model as a GGUF file with the ``gguf`` package, without llama.cpp's scripts.

What goes in: llama.cpp's ``llama.*`` hyper-parameters, every weight under its GGUF name (Q and K rows permuted the
way llama.cpp's rotary kernels expect), a ``rope_freqs`` tensor for Llama 3's ``llama3`` rope scaling, and the
tokenizer (:mod:`lit_llama_lab.gguf_tokenizer`). Read back by llama.cpp, Ollama and transformers (``gguf_file=``).
Native types: f16, bf16, q8_0, q5_0, q4_0; K-quants are made from the f16 file by llama.cpp's ``llama-quantize``.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lit_llama_lab.io import atomic_file
from lit_llama_lab.tools.gguf_tokenizer import add_tokenizer

log = logging.getLogger(__name__)

# Written by this module from float32 weights.
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q5_0", "q4_0")
# Made by llama.cpp's llama-quantize binary from our f16 file, when it is on PATH.
K_QUANT_TYPES: tuple[str, ...] = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
ROPE_TYPES = ("default", "llama3")
QUANTIZE_BINARY = "llama-quantize"


class GgufExportError(ValueError):
    """A model or type GGUF export cannot write; the message names the fix."""


def permute_for_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection from HF's rotate-half layout to llama.cpp's interleaved pairs.

    The inverse of what transformers' GGUF loader (``LlamaTensorProcessor._reverse_permute_weights``) does.
    ``n_head`` is the number of heads of this projection (key/value heads for K).
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _ggml_type(qtype: str, gguf_name: str, array: np.ndarray):
    """1-D tensors (norms, rope_freqs) stay F32; matrices take ``qtype``. In q4_0/q5_0 files the embedding and
    output matrices are Q8_0 (llama-quantize likewise keeps them finer); rows not a multiple of 32 stay F16."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if array.ndim == 1:
        return kinds.F32
    if qtype in ("f16", "bf16"):
        return kinds.F16 if qtype == "f16" else kinds.BF16
    if array.shape[-1] % 32:
        return kinds.F16
    if qtype in ("q4_0", "q5_0") and gguf_name.split(".")[0] in ("token_embd", "output"):
        return kinds.Q8_0
    return {"q8_0": kinds.Q8_0, "q5_0": kinds.Q5_0, "q4_0": kinds.Q4_0}[qtype]


def _add_array(writer, name: str, array: np.ndarray, kind) -> None:
    import gguf

    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def add_tensors(writer, state_dict: dict[str, torch.Tensor], config, qtype: str) -> None:
    """Add every weight of an HF Llama ``state_dict`` to ``writer`` under its GGUF name, converted to ``qtype``."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd; an output.weight would untie them on load
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise GgufExportError(f"No GGUF name for the weight {hf_name!r}: GGUF export supports Llama models only.")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith("attn_q"):
            array = permute_for_rotary(array, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            array = permute_for_rotary(array, config.num_key_value_heads)
        _add_array(writer, f"{gguf_name}.{suffix}", array, _ggml_type(qtype, gguf_name, array))
    if (factors := llama3_rope_factors(config)) is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)


def rope_parameters(config) -> dict:
    """The config's rope settings (``rope_parameters`` in transformers 5, ``rope_scaling`` before), type defaulted."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def head_dim(config) -> int:
    """Per-head width: the config's ``head_dim`` or hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray | None:
    """For ``llama3`` rope scaling, the per-frequency divisors llama.cpp reads from ``rope_freqs`` (float32, one per
    rotary pair); None for default rope.

    Llama 3's rule: wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` keep their
    frequency (factor 1), longer than ``… / low_freq_factor`` are slowed by ``factor``, and those between blend
    smoothly, as transformers' ``_compute_llama3_parameters`` does to ``inv_freq``.
    """
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = head_dim(config)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelength = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelength - low) / (high - low), 0.0, 1.0)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    return factors.astype(np.float32)


def check_architecture(config) -> None:
    """Refuse what the writer cannot express: a non-Llama architecture or a rope type other than default/llama3."""
    if getattr(config, "model_type", "llama") != "llama":
        raise GgufExportError(
            f"GGUF export writes Llama-architecture models only, not {config.model_type!r}; pass --gguf none to "
            "export the merged HF folder alone (llama.cpp's convert_hf_to_gguf.py can convert that folder)."
        )
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise GgufExportError(
            f"GGUF export supports rotary embeddings of type {' or '.join(ROPE_TYPES)}, not {rope_type!r}; pass "
            "--gguf none to export the merged HF folder alone."
        )


def add_hyperparameters(writer, config, qtype: str, name: str) -> None:
    """llama.cpp's ``llama.*`` keys from an HF ``LlamaConfig`` (see :func:`check_architecture` for what is refused)."""
    import gguf

    check_architecture(config)
    dim = head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    path: Path, state_dict: dict[str, torch.Tensor], config, tokenizer, qtype: str = "f16",
    name: str = "model", pre: str = "gpt-2",
) -> Path:
    """Write a complete GGUF file at ``path``, atomically (a temp file in the same folder, then renamed).

    ``state_dict`` holds HF Llama weight names; quantize from float32 weights for the least rounding. ``pre`` is
    the llama.cpp pre-tokenizer name (:func:`lit_llama_lab.gguf_tokenizer.pre_tokenizer_name`).
    """
    import gguf

    if qtype not in GGUF_TYPES:
        raise GgufExportError(f"Unknown GGUF type {qtype!r}; choose from {', '.join(GGUF_TYPES)}.")
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        add_hyperparameters(writer, config, qtype, name)
        add_tokenizer(writer, tokenizer, config.vocab_size, pre)
        add_tensors(writer, state_dict, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("Wrote %s (%s, %.1f MB)", path, qtype, path.stat().st_size / 1e6)
    return path


def require_quantize_binary(qtype: str) -> str:
    """The path of ``llama-quantize`` (on PATH, else beside the Python interpreter) for a K-quant ``qtype``; raises
    :class:`GgufExportError` naming the fix."""
    beside_python = Path(sys.executable).parent / QUANTIZE_BINARY  # `make llama-quantize` puts it in the venv
    binary = shutil.which(QUANTIZE_BINARY) or (str(beside_python) if beside_python.is_file() else None)
    if binary is None:
        raise GgufExportError(
            f"GGUF type {qtype!r} is a K-quant, which only llama.cpp's {QUANTIZE_BINARY} binary writes, and it is not "
            f"on PATH nor in the virtualenv. Run `make llama-quantize` (builds it into .venv/bin), or choose one of "
            f"{', '.join(GGUF_TYPES)}."
        )
    return binary


def quantize_with_llama_cpp(source: Path, path: Path, qtype: str) -> Path:
    """Make a K-quant GGUF at ``path`` from the f16 GGUF ``source`` with ``llama-quantize``, atomically."""
    binary = require_quantize_binary(qtype)
    with atomic_file(path) as tmp:
        done = subprocess.run([binary, str(source), str(tmp), qtype.upper()], capture_output=True, text=True)
        if done.returncode != 0:
            raise GgufExportError(f"{QUANTIZE_BINARY} failed on {source.name} -> {qtype}: {done.stderr[-2000:]}")
    return path
