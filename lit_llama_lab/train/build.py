"""The one setup sequence of a training run, read top to bottom: base load → adapters → speed techniques, as the
:class:`~lit_llama_lab.train.plan.Plan` says. Lightning training (:class:`lit_llama_lab.train.module.QLoRAModule`)
and the bench's ``ours`` paths (:mod:`lit_llama_lab.tools.bench`) both call :func:`build`, so the bench measures what
trains."""

from __future__ import annotations

import logging

import torch

from lit_llama_lab.model.adapters import apply_init_adapter, read_init_adapter
from lit_llama_lab.model.fsdp import wrap_for_fsdp
from lit_llama_lab.model.load import load_base_model
from lit_llama_lab.model.precision import adapter_matmuls_in, keep_fp32_activations
from lit_llama_lab.speed.attention import use_attention
from lit_llama_lab.speed.compile import apply_liger, checkpoint_kwargs, compile_decoder_layers
from lit_llama_lab.speed.dequantize import cache_dequantized_weights
from lit_llama_lab.speed.memory import chunk_mlp, offload_checkpoints
from lit_llama_lab.train.args import LoraArgs, PrecisionArgs, SpeedArgs
from lit_llama_lab.train.plan import Plan, resolve, target_for

log = logging.getLogger(__name__)


def plan_for(name_or_path: str, quantize: str, precision: PrecisionArgs, speed: SpeedArgs, lora: LoraArgs,
             device: str | torch.device | None = None, world_size: int = 1, fsdp: bool = False,
             wrapped: bool = False) -> Plan:
    """The :class:`~lit_llama_lab.train.plan.Plan` of a run on ``device`` (its model's config read, no weights)."""
    return resolve(precision, speed, lora.dropout,
                   target_for(name_or_path, quantize, device, world_size, fsdp, wrapped))


def build(name_or_path: str, quantize: str, lora: LoraArgs, plan: Plan, init_adapter: str | None = None,
          seed: int | None = None, training: bool = True):
    """Load the base and attach the adapters and every speed technique of ``plan``; returns ``(peft model,
    tokenizer)``, the model in train mode when ``training``.

    ``seed``: seeds torch just before the adapters are made (a reproducible init; Lightning's ``seed_everything``
    seeds training). An ``init_adapter`` of other settings is refused before the base loads. Under FSDP the
    adapter leaves and decoder layers become FSDP units (inside Lightning's ``configure_model``).
    """
    from peft import get_peft_model

    init_state = read_init_adapter(init_adapter, name_or_path, lora) if init_adapter else None
    base, tokenizer = load_base_model(name_or_path, quantize, plan.compute_dtype, plan.device, plan.load_attention,
                                      plan.quant_storage)
    base.config.use_cache = False
    if plan.tf32:
        torch.set_float32_matmul_precision("high")
    if plan.liger:
        apply_liger(base)
    if plan.attention == "varlen":
        use_attention(base, "varlen")
    if plan.fp32_activations:
        keep_fp32_activations(base)
    if plan.gradient_checkpointing:
        # checkpointing saves the RNG state to replay dropout, which a CUDA graph capture cannot do (the plan
        # turned graphs off where there is dropout to replay)
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpoint_kwargs(plan.compile, preserve_rng_state=not plan.cuda_graphs))
    if seed is not None:
        torch.manual_seed(seed)
    model = get_peft_model(base, lora.peft_config())
    if init_state is not None:
        apply_init_adapter(model, init_state, init_adapter)
        log.info("Adapters start from %s (%d tensors).", init_adapter, len(init_state))
    if plan.adapter_matmul_dtype != torch.float32:
        swapped = adapter_matmuls_in(model, plan.adapter_matmul_dtype)
        log.info("%d adapter matrices multiply in %s (fp32 weights).", swapped, plan.adapter_matmul_dtype)
    if plan.dequantize_once:
        cache_dequantized_weights(model)
    chunk_mlp(model, plan.mlp_chunks, plan.memory_min_tokens)
    if plan.compile:
        compile_decoder_layers(model)
    if plan.offload_checkpoints:
        offload_checkpoints(model, plan.memory_min_tokens)
    # from_pretrained returns eval mode: dropout and gradient checkpointing (both need .training) would be off
    model.train(training)
    if plan.fsdp:
        wrap_for_fsdp(model, torch.device(plan.device))
    return model, tokenizer
