"""Loading a base model in 4-bit (bitsandbytes NF4, double quantization), or a base with an adapter folder on top.

Accepted names of base models: :data:`lit_llama_lab.model.source.ACCEPTED_FORMS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lit_llama_lab.model.adapters import adapter_metadata, check_adapter_weights, is_adapter_folder
from lit_llama_lab.model.folders import model_folder
from lit_llama_lab.model.precision import keep_fp32_activations, resolve_compute_dtype
from lit_llama_lab.model.source import resolve_model_source
from lit_llama_lab.model.tokens import fix_special_tokens

Quantize = Literal["nf4", "fp4", "none"]


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
    """The tokenizer of a base model, with eos/pad fixed (:func:`lit_llama_lab.model.tokens.fix_special_tokens`),
    padding on the left."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(name_or_path))
    fix_special_tokens(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def model_config(name_or_path: str):
    """The HF config of a base model, read without loading its weights (what the training plan is decided from)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_folder(name_or_path))


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
    ``quant_storage`` is the dtype of the packed 4-bit weights
    (:func:`lit_llama_lab.model.precision.resolve_quant_storage`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    folder = model_folder(name_or_path)
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


def load_for_inference(
    name_or_path: str,
    quantize: Quantize | None = None,
    compute_dtype: str = "auto",
    device: str | torch.device | None = None,
    fp32_activations: bool = True,
):
    """Load a base model, or a base with an adapter folder on top, ready for
    :func:`lit_llama_lab.generation.generate`.

    For an adapter folder the base comes from its ``lit_llama_lab.json`` (or peft's ``base_model_name_or_path``)
    and is quantized as in training unless ``quantize`` says otherwise. ``fp32_activations``: hidden states between
    matmuls stay fp32 under a bf16/fp16 compute dtype, as training keeps them for models narrower than 1024
    (:func:`lit_llama_lab.model.precision.keep_fp32_activations`).
    Returns ``(model, tokenizer)`` in eval mode.
    """
    dtype = resolve_compute_dtype(compute_dtype, device)
    if is_adapter_folder(name_or_path):
        from peft import PeftModel

        folder = Path(name_or_path)
        check_adapter_weights(folder)  # a missing or truncated file named before the base loads
        meta = adapter_metadata(folder)
        model, tokenizer = load_base_model(meta["base_model"], quantize or meta.get("quantize", "nf4"), dtype, device)
        model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    else:
        model, tokenizer = load_base_model(name_or_path, quantize or "nf4", dtype, device)
    if fp32_activations:
        keep_fp32_activations(model)
    model.eval()
    return model, tokenizer
